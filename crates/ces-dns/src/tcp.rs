//! DNS over TCP (RFC 7766): the answers of a connection are 2-byte-length-prefixed messages that may be split across
//! segments and share segments. The gateway sees the server's segments one at a time; this puts each connection's
//! stream back together, in order, and hands out every message that a segment completes (that segment is the one to
//! hold until the message's addresses are in the kernel: the client cannot read the message before it arrives).
//!
//! Bounded: at most `max_streams` connections are followed (the least recently seen goes), and a connection's
//! buffer never holds more than one message. A gap (a lost or reordered segment) or a segment that does not start
//! where the stream stands ends the stream's following: its remaining answers pass unlearned, counted as
//! [`Outcome::Lost`].

use std::collections::HashMap;
use std::net::IpAddr;

/// A connection as the server's segments carry it: server address and port, client address and port.
pub type StreamKey = (IpAddr, u16, IpAddr, u16);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whole messages this segment completed, in order.
    pub messages: Vec<Vec<u8>>,
    /// The stream could not be followed through this segment.
    pub lost: bool,
}

struct Stream {
    next: u32,
    buf: Vec<u8>,
    seen: u64,
}

pub struct Reassembler {
    streams: HashMap<StreamKey, Stream>,
    max_streams: usize,
    tick: u64,
}

/// The most a buffer holds: one message and its length.
const MAX_BUFFER: usize = 2 + 65535;

impl Reassembler {
    pub fn new(max_streams: usize) -> Reassembler {
        Reassembler { streams: HashMap::new(), max_streams: max_streams.max(1), tick: 0 }
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Takes one segment from the server: its sequence number, SYN/FIN/RST flags and payload.
    pub fn segment(&mut self, key: StreamKey, seq: u32, syn: bool, end: bool, payload: &[u8]) -> Outcome {
        self.tick += 1;
        let mut out = Outcome::default();
        if syn {
            self.insert(key, Stream { next: seq.wrapping_add(1), buf: Vec::new(), seen: self.tick });
            if payload.is_empty() {
                return out;
            }
        }
        if !payload.is_empty() {
            let tick = self.tick;
            match self.streams.get_mut(&key) {
                Some(s) => {
                    s.seen = tick;
                    let ahead = seq.wrapping_sub(s.next);
                    if ahead == 0 {
                        s.buf.extend_from_slice(payload);
                        s.next = s.next.wrapping_add(payload.len() as u32);
                    } else if ahead > u32::MAX / 2 {
                        // Starts before where the stream stands: a retransmission, maybe with new bytes at its end.
                        let old = s.next.wrapping_sub(seq) as usize;
                        if old < payload.len() {
                            s.buf.extend_from_slice(&payload[old..]);
                            s.next = s.next.wrapping_add((payload.len() - old) as u32);
                        }
                    } else {
                        out.lost = true;
                        self.streams.remove(&key);
                        return out;
                    }
                }
                None => {
                    // A stream whose start this agent did not see (it started before the agent did): follow it
                    // only if this segment plausibly starts a message.
                    if payload.len() < 2 {
                        out.lost = true;
                        return out;
                    }
                    let stream =
                        Stream { next: seq.wrapping_add(payload.len() as u32), buf: payload.to_vec(), seen: self.tick };
                    self.insert(key, stream);
                }
            }
            let s = self.streams.get_mut(&key).expect("present");
            while s.buf.len() >= 2 {
                let len = u16::from_be_bytes([s.buf[0], s.buf[1]]) as usize;
                if s.buf.len() < 2 + len {
                    break;
                }
                out.messages.push(s.buf[2..2 + len].to_vec());
                s.buf.drain(..2 + len);
            }
            debug_assert!(s.buf.len() <= MAX_BUFFER);
        }
        if end {
            self.streams.remove(&key);
        }
        out
    }

    fn insert(&mut self, key: StreamKey, s: Stream) {
        if self.streams.len() >= self.max_streams && !self.streams.contains_key(&key) {
            let oldest = self.streams.iter().min_by_key(|(_, s)| s.seen).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.streams.remove(&k);
            }
        }
        self.streams.insert(key, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        ("192.0.2.53".parse().unwrap(), 53, "10.0.0.1".parse().unwrap(), 40000)
    }

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for m in msgs {
            v.extend_from_slice(&(m.len() as u16).to_be_bytes());
            v.extend_from_slice(m);
        }
        v
    }

    #[test]
    fn messages_split_and_shared_across_segments_come_out_whole_and_in_order() {
        let mut r = Reassembler::new(8);
        assert_eq!(r.segment(key(), 1000, true, false, &[]), Outcome::default());
        let stream = framed(&[b"first message", b"second", b"third one"]);
        // Cut at every awkward place: inside a length prefix, between messages, inside a message.
        let cuts = [1, 9, 15, 16, 24, stream.len()];
        let (mut at, mut got) = (0, Vec::new());
        for c in cuts {
            let o = r.segment(key(), 1001 + at as u32, false, false, &stream[at..c]);
            assert!(!o.lost);
            got.extend(o.messages);
            at = c;
        }
        assert_eq!(got, [b"first message".to_vec(), b"second".to_vec(), b"third one".to_vec()]);
    }

    #[test]
    fn retransmissions_are_taken_once_and_gaps_end_the_stream() {
        let mut r = Reassembler::new(8);
        r.segment(key(), u32::MAX, true, false, &[]);
        let stream = framed(&[b"abcdef"]);
        // Sequence numbers wrap around zero here.
        assert!(r.segment(key(), 0, false, false, &stream[..4]).messages.is_empty());
        // The same bytes again, plus the rest.
        assert_eq!(r.segment(key(), 0, false, false, &stream).messages, [b"abcdef".to_vec()]);
        assert!(r.segment(key(), 0, false, false, &stream).messages.is_empty(), "a pure retransmission");
        let o = r.segment(key(), 100, false, false, b"xx");
        assert!(o.lost, "a gap");
        assert_eq!(r.streams(), 0);
    }

    #[test]
    fn streams_are_bounded() {
        let mut r = Reassembler::new(2);
        for port in 0..10u16 {
            let k = (key().0, 53, key().2, port);
            r.segment(k, 1, true, false, &[]);
        }
        assert_eq!(r.streams(), 2);
        let k = (key().0, 53, key().2, 9);
        assert_eq!(r.segment(k, 2, false, true, &framed(&[b"x"])).messages, [b"x".to_vec()], "the newest is kept");
        assert_eq!(r.streams(), 1, "FIN ends it");
    }
}
