//! AS3 object names: the original's names (ces-original.md §3.2), shortened deterministically when too long.

/// AS3's limit on property names: `^[A-Za-z]([0-9A-Za-z_.-]{0,188}[0-9A-Za-z_.])?$`.
pub const MAX_NAME: usize = 190;

/// `name` as AS3 accepts it: unchanged when it fits; otherwise its first characters, `_` and 16 hex digits of a
/// hash of the whole name, 190 characters in all. Two long names that differ anywhere get different hashes.
pub fn fit(name: String) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    let hash = format!("{:016x}", fnv1a(name.as_bytes()));
    let keep = MAX_NAME - hash.len() - 1;
    let mut cut = keep;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hash}", &name[..cut])
}

/// FNV-1a, 64 bits: stable across builds and platforms, which object names must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Does `name` match AS3's property-name pattern?
pub fn valid(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-');
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|&c| inner(c))
        && (b.len() == 1 || b[b.len() - 1] != b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_with_a_hash_of_the_whole_name() {
        let short = "k8s_svc_default_rule4_ext_exsvc4_rule_list".to_string();
        assert_eq!(fit(short.clone()), short);
        let a = format!("k8s_ns_{}_r_ext_e_rule_list", "a".repeat(200));
        let b = format!("k8s_ns_{}_r_ext_e_rule_lisT", "a".repeat(200));
        let (fa, fb) = (fit(a.clone()), fit(b));
        assert_eq!(fa.len(), MAX_NAME);
        assert!(valid(&fa), "{fa}");
        assert_ne!(fa, fb, "names that differ only past the cut stay apart");
        assert_eq!(fa, fit(a), "deterministic");
        assert!(fa.starts_with("k8s_ns_aaaa"));
    }

    #[test]
    fn the_name_pattern_is_as3s() {
        assert!(valid("k8s_gw_pool"));
        assert!(valid("a"));
        assert!(!valid("8k"));
        assert!(!valid("k8s_a-"));
        assert!(!valid("k8s/a"));
        assert!(!valid(&"a".repeat(191)));
    }
}
