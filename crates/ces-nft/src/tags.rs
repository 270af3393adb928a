//! Stable ids for the table's tags (what a verdict line stands for: tenant, context, rule, action, mode,
//! ExternalService). The id is in the log prefix of the line's packets (`ces/<id>`) and, for the lines that accept,
//! in the connection's conntrack label (bits 64-79), so that a record names the rule that decided even minutes
//! later, after the table changed.
//!
//! An id is never given to another tag while connections may still carry it: a tag that leaves the table is retired
//! with its id, and its id is reused only when every other id is taken (then the oldest retired goes first). A
//! restarted agent reads the table back from a file ([`TagIds::load`]), so the connections it finds still name their
//! rules. Id 0 is reserved (no label bit set: not decided by CES; as a log prefix, an ICMP error of a connection).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::LogTag;

/// The first conntrack label bit of the id.
pub const LABEL_BIT: u32 = 64;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagIds {
    /// Tags of the table last rendered, by id.
    live: BTreeMap<u16, LogTag>,
    /// Tags that left the table, by id, with when they left (µs since the epoch).
    retired: BTreeMap<u16, (LogTag, i64)>,
    /// Where the search for a free id starts.
    next: u16,
    /// Ids used by the render in progress.
    #[serde(skip)]
    seen: std::collections::BTreeSet<u16>,
    /// Whether a line of the table audits (its hits are joined to their connections).
    #[serde(skip)]
    audits: bool,
}

impl TagIds {
    /// Reads the ids a previous agent left in `path` (an absent or unreadable file is a fresh start).
    pub fn load(path: &Path) -> TagIds {
        let mut t: TagIds = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        t.audits = t.live.values().any(|t| t.mode == "audit");
        t
    }

    /// Writes the ids to `path` atomically (a temporary file renamed over it), mode 0600.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }

    /// Starts a render: ids given out until [`TagIds::finish`] are the table's.
    pub fn begin(&mut self) {
        self.seen.clear();
    }

    /// The id of `tag`: the one it had (live or retired), or a free one.
    pub fn id(&mut self, tag: &LogTag) -> u16 {
        if let Some((&id, _)) = self.live.iter().find(|(_, t)| *t == tag) {
            self.seen.insert(id);
            return id;
        }
        if let Some((&id, _)) = self.retired.iter().find(|(_, (t, _))| t == tag) {
            let (t, _) = self.retired.remove(&id).expect("found");
            self.live.insert(id, t);
            self.seen.insert(id);
            return id;
        }
        let id = self.free();
        self.live.insert(id, tag.clone());
        self.seen.insert(id);
        id
    }

    fn free(&mut self) -> u16 {
        for _ in 0..u16::MAX {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.live.contains_key(&self.next) && !self.retired.contains_key(&self.next) {
                return self.next;
            }
        }
        // Every id is live or retired: the oldest retired one is given again.
        let oldest = self
            .retired
            .iter()
            .filter(|(id, _)| !self.seen.contains(id))
            .min_by_key(|(_, (_, at))| *at)
            .map(|(id, _)| *id);
        let id = oldest.unwrap_or(1);
        self.retired.remove(&id);
        id
    }

    /// Ends a render at `now` (µs): tags it did not use retire.
    pub fn finish(&mut self, now: i64) {
        let gone: Vec<u16> = self.live.keys().filter(|id| !self.seen.contains(id)).copied().collect();
        for id in gone {
            let t = self.live.remove(&id).expect("listed");
            self.retired.insert(id, (t, now));
        }
        self.audits = self.live.values().any(|t| t.mode == "audit");
    }

    /// Whether a line of the table audits.
    pub fn audits(&self) -> bool {
        self.audits
    }

    /// The tag of `id`, and whether it has left the table.
    pub fn get(&self, id: u16) -> Option<(&LogTag, bool)> {
        self.live.get(&id).map(|t| (t, false)).or_else(|| self.retired.get(&id).map(|(t, _)| (t, true)))
    }

    /// The table's tags, by id.
    pub fn live(&self) -> &BTreeMap<u16, LogTag> {
        &self.live
    }
}

/// The statements that write `id` into a connection's label: one `ct label set` per bit that is set.
pub fn label_statements(id: u16) -> String {
    (0..16)
        .filter(|b| id & (1 << b) != 0)
        .map(|b| format!("ct label set {}", LABEL_BIT + b))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The id in a connection's labels, as conntrack reports them (`CTA_LABELS`: the kernel's array of native-endian
/// words).
pub fn id_from_labels(labels: &[u8]) -> u16 {
    let word = (LABEL_BIT / 64) as usize;
    let Some(b) = labels.get(word * 8..word * 8 + 8) else { return 0 };
    let w = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
    (w >> (LABEL_BIT % 64) & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use ces_model::Context;

    fn tag(rule: &str) -> LogTag {
        LogTag {
            tenant: "payments".into(),
            context: Context::Namespace,
            rule: rule.into(),
            action: "accept-decisively".into(),
            mode: "enforce".into(),
            external_service: None,
        }
    }

    #[test]
    fn ids_are_stable_retired_not_reused_and_survive_a_restart() {
        let mut ids = TagIds::default();
        ids.begin();
        let (a, b) = (ids.id(&tag("a")), ids.id(&tag("b")));
        ids.finish(1);
        ids.begin();
        assert_eq!(ids.id(&tag("b")), b, "the same tag keeps its id");
        let c = ids.id(&tag("c"));
        ids.finish(2);
        assert_ne!(c, a, "a retired id is not given to another tag");
        assert_eq!(ids.get(a).map(|(t, retired)| (t.rule.as_str(), retired)), Some(("a", true)));
        ids.begin();
        assert_eq!(ids.id(&tag("a")), a, "a tag that comes back gets its id back");
        ids.finish(3);
        let path = std::env::temp_dir().join(format!("ces-tags-{}.json", std::process::id()));
        ids.save(&path).unwrap();
        let mut again = TagIds::load(&path);
        again.begin();
        assert_eq!((again.id(&tag("a")), again.id(&tag("c"))), (a, c));
        assert_eq!(
            std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .unwrap(),
            0o600
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn labels_carry_the_id() {
        assert_eq!(label_statements(5), "ct label set 64 ct label set 66");
        let mut labels = [0u8; 16];
        labels[8..16].copy_from_slice(&(0b101u64).to_ne_bytes());
        assert_eq!(id_from_labels(&labels), 5);
        assert_eq!(id_from_labels(&[0u8; 4]), 0, "too short: no id");
        for id in [1u16, 0x8001, 0xffff] {
            let bits: u64 = (0..16).filter(|b| id & (1 << b) != 0).map(|b| 1u64 << b).sum();
            let mut l = [0u8; 16];
            l[8..16].copy_from_slice(&bits.to_ne_bytes());
            assert_eq!(id_from_labels(&l), id);
        }
    }
}
