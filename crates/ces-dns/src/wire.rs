//! DNS messages on the wire (RFC 1035 §4), read defensively: every length is checked against the message, a
//! compression pointer must point before every position the name has visited (so a name cannot loop), a name is
//! at most 255 bytes, and a record whose data is not what its type says is an error. Only the header, the question
//! section and the answer section are read: nothing else says which addresses a name has.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Compression pointers one name may follow: a name has at most 127 labels, each of which may start a suffix.
const MAX_JUMPS: usize = 127;

/// Why a message could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The message ends inside a header, name or record.
    Truncated,
    /// A name longer than 255 bytes on the wire.
    NameTooLong,
    /// A label type other than a plain label or a compression pointer (RFC 6891 dropped the extended ones).
    LabelType,
    /// A compression pointer that does not point before everything the name has read (a loop, or forwards).
    Pointer,
    /// A record whose data length does not fit its type (an A record that is not 4 bytes, ...).
    RecordData,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::Truncated => "the message ends early",
            Malformed::NameTooLong => "a name is longer than 255 bytes",
            Malformed::LabelType => "a label of an unknown type",
            Malformed::Pointer => "a compression pointer that does not point backwards",
            Malformed::RecordData => "a record's data does not fit its type",
        })
    }
}

impl std::error::Error for Malformed {}

/// One question: the name asked for and the type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
}

/// The data of an answer record, for the types that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// Any other type or class.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// Seconds; a TTL with the top bit set counts as 0 (RFC 2181 §8).
    pub ttl: u32,
    pub data: Data,
}

/// The parts of a message that say what a name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// QR: this is a response.
    pub response: bool,
    pub opcode: u8,
    /// TC: the answer was cut to fit (the records that are here are whole).
    pub truncated: bool,
    pub rcode: u8,
    pub questions: Vec<Question>,
    pub answers: Vec<Record>,
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, Malformed> {
    let b = m.get(at..at + 2).ok_or(Malformed::Truncated)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn u32_at(m: &[u8], at: usize) -> Result<u32, Malformed> {
    let b = m.get(at..at + 4).ok_or(Malformed::Truncated)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads the name at `at`; returns it and the position after it (after its first pointer, if it has one).
///
/// The text is lower case without a trailing dot (the root is the empty name). Bytes a host name never holds are
/// written escaped, as `dig` does (`\.` for a dot inside a label, `\DDD` for others), so that the text of a name is
/// unambiguous: a label `api.stripe` followed by `com` is `api\.stripe.com`, which no rule's `api.stripe.com` can
/// match.
pub fn read_name(m: &[u8], at: usize) -> Result<(String, usize), Malformed> {
    let mut text = String::new();
    let mut pos = at;
    let mut end = None;
    // Every pointer must point before this: strictly decreasing targets cannot loop.
    let mut limit = at;
    let mut wire = 0usize;
    let mut jumps = 0;
    loop {
        let len = *m.get(pos).ok_or(Malformed::Truncated)? as usize;
        match len >> 6 {
            0 if len == 0 => {
                return Ok((text, end.unwrap_or(pos + 1)));
            }
            0 => {
                let label = m.get(pos + 1..pos + 1 + len).ok_or(Malformed::Truncated)?;
                wire += len + 1;
                if wire + 1 > 255 {
                    return Err(Malformed::NameTooLong);
                }
                if !text.is_empty() {
                    text.push('.');
                }
                for &b in label {
                    let b = b.to_ascii_lowercase();
                    match b {
                        b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => text.push(b as char),
                        b'.' => text.push_str("\\."),
                        _ => text.push_str(&format!("\\{b:03}")),
                    }
                }
                pos += 1 + len;
            }
            3 => {
                let ptr = ((len & 0x3f) << 8) | *m.get(pos + 1).ok_or(Malformed::Truncated)? as usize;
                if end.is_none() {
                    end = Some(pos + 2);
                }
                // A pointer to a pointer adds no length: without a bound, one name could make thousands of jumps.
                jumps += 1;
                if ptr >= limit || jumps > MAX_JUMPS {
                    return Err(Malformed::Pointer);
                }
                limit = ptr;
                pos = ptr;
            }
            _ => return Err(Malformed::LabelType),
        }
    }
}

/// Parses a message: the header, every question and every answer record.
pub fn parse(m: &[u8]) -> Result<Message, Malformed> {
    let id = u16_at(m, 0)?;
    let flags = u16_at(m, 2)?;
    let qd = u16_at(m, 4)? as usize;
    let an = u16_at(m, 6)? as usize;
    let mut pos = 12;
    if m.len() < pos {
        return Err(Malformed::Truncated);
    }
    // A question takes at least 5 bytes and a record 11: counts beyond what the message can hold are false, and
    // must not size allocations.
    let mut questions = Vec::with_capacity(qd.min(m.len() / 5));
    for _ in 0..qd {
        let (name, next) = read_name(m, pos)?;
        let qtype = u16_at(m, next)?;
        u16_at(m, next + 2)?;
        questions.push(Question { name, qtype });
        pos = next + 4;
    }
    let mut answers = Vec::with_capacity(an.min(m.len() / 11));
    for _ in 0..an {
        let (name, next) = read_name(m, pos)?;
        let rtype = u16_at(m, next)?;
        let class = u16_at(m, next + 2)?;
        let ttl = u32_at(m, next + 4)?;
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        let rdlen = u16_at(m, next + 8)? as usize;
        let rdata_at = next + 10;
        let rdata = m.get(rdata_at..rdata_at + rdlen).ok_or(Malformed::Truncated)?;
        let data = match (class, rtype) {
            (CLASS_IN, TYPE_A) => {
                Data::A(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).map_err(|_| Malformed::RecordData)?))
            }
            (CLASS_IN, TYPE_AAAA) => {
                Data::Aaaa(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).map_err(|_| Malformed::RecordData)?))
            }
            (CLASS_IN, TYPE_CNAME) => {
                let (target, after) = read_name(m, rdata_at)?;
                if after > rdata_at + rdlen {
                    return Err(Malformed::RecordData);
                }
                Data::Cname(target)
            }
            _ => Data::Other,
        };
        answers.push(Record { name, ttl, data });
        pos = rdata_at + rdlen;
    }
    Ok(Message {
        id,
        response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0xf) as u8,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0xf) as u8,
        questions,
        answers,
    })
}

/// Builds messages for tests and benchmarks: names uncompressed, or with the suffix of an earlier name compressed.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    pub id: u16,
    pub flags: u16,
    pub questions: Vec<(String, u16)>,
    pub answers: Vec<(String, u32, BuiltData)>,
    /// Compress every name that equals an earlier question's name with a pointer to it.
    pub compress: bool,
}

#[derive(Clone, Debug)]
pub enum BuiltData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// Raw record: type and data.
    Raw(u16, Vec<u8>),
}

/// A name in wire form, uncompressed.
pub fn name_bytes(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

impl Builder {
    /// A response (QR set, RD and RA set, NOERROR) to `questions`, with `answers`.
    pub fn response(id: u16) -> Builder {
        Builder { id, flags: 0x8180, ..Builder::default() }
    }

    pub fn question(mut self, name: &str, qtype: u16) -> Builder {
        self.questions.push((name.to_string(), qtype));
        self
    }

    pub fn answer(mut self, name: &str, ttl: u32, data: BuiltData) -> Builder {
        self.answers.push((name.to_string(), ttl, data));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.flags.to_be_bytes());
        m.extend_from_slice(&(self.questions.len() as u16).to_be_bytes());
        m.extend_from_slice(&(self.answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        let mut offsets: Vec<(String, usize)> = Vec::new();
        let mut put_name = |m: &mut Vec<u8>, name: &str| {
            if self.compress
                && let Some((_, off)) = offsets.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                m.extend_from_slice(&(0xc000u16 | *off as u16).to_be_bytes());
                return;
            }
            offsets.push((name.to_string(), m.len()));
            m.extend_from_slice(&name_bytes(name));
        };
        for (name, qtype) in &self.questions {
            put_name(&mut m, name);
            m.extend_from_slice(&qtype.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
        }
        for (name, ttl, data) in &self.answers {
            put_name(&mut m, name);
            let (ty, rdata) = match data {
                BuiltData::A(a) => (TYPE_A, a.octets().to_vec()),
                BuiltData::Aaaa(a) => (TYPE_AAAA, a.octets().to_vec()),
                BuiltData::Cname(c) => (TYPE_CNAME, name_bytes(c)),
                BuiltData::Raw(t, d) => (*t, d.clone()),
            };
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(&rdata);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_with_compression_reads_back() {
        let m = Builder {
            compress: true,
            ..Builder::response(7)
                .question("API.Stripe.com.", TYPE_A)
                .answer("api.stripe.com", 60, BuiltData::A("192.0.2.1".parse().unwrap()))
                .answer("api.stripe.com", 30, BuiltData::Aaaa("2001:db8::1".parse().unwrap()))
        }
        .build();
        let msg = parse(&m).unwrap();
        assert_eq!(msg.id, 7);
        assert!(msg.response && !msg.truncated);
        assert_eq!(msg.questions, [Question { name: "api.stripe.com".into(), qtype: TYPE_A }]);
        assert_eq!(msg.answers.len(), 2);
        assert_eq!(msg.answers[0].name, "api.stripe.com", "compressed owner read through the pointer");
        assert_eq!(msg.answers[1].data, Data::Aaaa("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn hostile_names_are_refused() {
        // A pointer to itself.
        let mut m = Builder::response(1).build();
        m[5] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&m), Err(Malformed::Pointer));
        // Two pointers pointing at each other: the second points forward of the first's target.
        let mut m = Builder::response(1).build();
        m[5] = 1;
        m.extend_from_slice(&[1, b'a', 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&m), Err(Malformed::Pointer));
        // A label running past the end.
        let mut m = Builder::response(1).build();
        m[5] = 1;
        m.extend_from_slice(&[63, b'a', b'b']);
        assert_eq!(parse(&m), Err(Malformed::Truncated));
        // A name of 128 one-byte labels is longer than 255 bytes.
        let long = vec!["a"; 128].join(".");
        let m = Builder::response(1).question(&long, TYPE_A).build();
        assert_eq!(parse(&m), Err(Malformed::NameTooLong));
        // A chain of pointers, each to the one before: decreasing, but far too many. The chain sits in the data of
        // an unknown record; a second record's owner name enters it at its end.
        let mut chain = vec![0u8];
        let base = 12 + 1 + 10; // the first record: root owner, then type, class, TTL, length
        for i in 0..200u16 {
            let target = if i == 0 { base } else { base + 1 + 2 * (i as usize - 1) };
            chain.extend_from_slice(&(0xc000 | target as u16).to_be_bytes());
        }
        let mut m = Builder::response(1).answer("", 1, BuiltData::Raw(99, chain.clone())).build();
        m[7] = 2;
        let last = base + 1 + 2 * 199;
        m.extend_from_slice(&(0xc000 | last as u16).to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 192, 0, 2, 1]);
        assert_eq!(parse(&m), Err(Malformed::Pointer));
        // The same chain, short enough, reads as the root name.
        let short = &chain[..1 + 2 * 20];
        let mut m = Builder::response(1).answer("", 1, BuiltData::Raw(99, short.to_vec())).build();
        m[7] = 2;
        m.extend_from_slice(&(0xc000 | (base + 1 + 2 * 19) as u16).to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 192, 0, 2, 1]);
        assert_eq!(parse(&m).unwrap().answers[1].name, "");
        // The extended label types.
        let mut m = Builder::response(1).build();
        m[5] = 1;
        m.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
        assert_eq!(parse(&m), Err(Malformed::LabelType));
        // An A record of 5 bytes.
        let m = Builder::response(1).answer("a.example", 1, BuiltData::Raw(TYPE_A, vec![1, 2, 3, 4, 5])).build();
        assert_eq!(parse(&m), Err(Malformed::RecordData));
        // Counts that promise more than the message holds.
        let mut m = Builder::response(1).question("a.example", TYPE_A).build();
        m[6] = 0xff;
        m[7] = 0xff;
        assert_eq!(parse(&m), Err(Malformed::Truncated));
    }

    #[test]
    fn labels_with_dots_or_odd_bytes_are_escaped_so_they_match_nothing() {
        let mut m = Builder::response(1).build();
        m[5] = 1;
        // One label `api.stripe`, then `com`.
        m.extend_from_slice(&[10]);
        m.extend_from_slice(b"api.stripe");
        m.extend_from_slice(&[3, b'c', b'o', b'm', 0, 0, 1, 0, 1]);
        assert_eq!(parse(&m).unwrap().questions[0].name, "api\\.stripe.com");
        let mut m = Builder::response(1).build();
        m[5] = 1;
        m.extend_from_slice(&[3, b'a', 0, b'B', 0, 0, 1, 0, 1]);
        assert_eq!(parse(&m).unwrap().questions[0].name, "a\\000b");
    }

    #[test]
    fn ttls_with_the_top_bit_are_zero() {
        let m =
            Builder::response(1).answer("a.example", 0x8000_0001, BuiltData::A("192.0.2.9".parse().unwrap())).build();
        assert_eq!(parse(&m).unwrap().answers[0].ttl, 0);
    }
}
