//! Recovery codes: ten single-use codes, shown once when TOTP enrollment is
//! confirmed, each standing in for one TOTP code when the phone is lost.

use rand::Rng as _;

use crate::crypto::MasterKey;

pub const COUNT: usize = 10;
/// 12 base32 characters: 60 bits each.
const LEN: usize = 12;
const _: () = assert!(LEN * 5 >= 50, "recovery codes carry at least 50 bits");
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const HASH_PURPOSE: &str = "recovery-code";

/// Fresh codes, formatted for people: `ABCD-EFGH-JKLM`.
pub fn generate() -> Vec<String> {
    let mut rng = rand::rngs::OsRng;
    (0..COUNT)
        .map(|_| {
            let raw: String = (0..LEN).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect();
            format!("{}-{}-{}", &raw[0..4], &raw[4..8], &raw[8..12])
        })
        .collect()
}

/// The canonical form of what a user typed (dashes and spaces dropped,
/// upper-cased), if it can be a recovery code at all.
pub fn normalise(input: &str) -> Option<String> {
    if input.len() > 64 {
        return None;
    }
    let code: String =
        input.chars().filter(|c| *c != '-' && !c.is_whitespace()).collect::<String>().to_ascii_uppercase();
    (code.len() == LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// What is stored: a keyed hash, so a database dump alone cannot be searched
/// for the 60-bit codes.
pub fn hash(master_key: &MasterKey, canonical: &str) -> Vec<u8> {
    master_key.keyed_hash(HASH_PURPOSE, canonical.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_distinct_60_bit_codes_that_normalise_back() {
        let codes = generate();
        assert_eq!(codes.len(), COUNT);
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), COUNT);
        for code in &codes {
            assert_eq!(code.len(), 14);
            let canonical = normalise(code).unwrap();
            assert_eq!(canonical, code.replace('-', ""));
            assert_eq!(normalise(&code.to_lowercase()).unwrap(), canonical);
            assert_eq!(normalise(&canonical).unwrap(), canonical);
        }
    }

    #[test]
    fn six_digit_codes_and_junk_are_not_recovery_codes() {
        for input in ["123456", "", "ABCD-EFGH-IJK", "ABCD-EFGH-IJKL0", "ABCD-EFGH-IJK1", &"A".repeat(100)] {
            assert_eq!(normalise(input), None, "{input}");
        }
    }
}
