//! API keys. A key is `tally_` followed by 48 hex digits (192 random bits); only its SHA-256 is
//! stored. A salted slow hash buys nothing for keys with this much entropy and would cost a
//! bcrypt per request; the hash is also what the in-memory key set is indexed by.

use rand::RngCore;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "tally_";
const SECRET_HEX_LEN: usize = 48;

/// A newly created key: the secret is shown once, the hash is stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub secret: String,
    pub hash: String,
    /// The first characters of the key, safe to display and log (`tally_1a2b3c4d`).
    pub display_prefix: String,
}

pub fn generate() -> NewKey {
    let mut bytes = [0u8; SECRET_HEX_LEN / 2];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    NewKey { hash: hash(&secret), display_prefix: display_prefix(&secret), secret }
}

/// Hex SHA-256 of the key as presented.
pub fn hash(secret: &str) -> String {
    hex::encode(digest(secret))
}

/// The SHA-256 of a key as bytes: what the services look keys up by (`hash` is its hex text, as
/// stored). Hex-encoding it on every request cost more than the SHA-256 itself.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The bytes of a stored hex `hash`, or None when it is not 64 lower-case hex digits (what
/// `hash` writes; a key whose stored text differs never matched when keys were compared as text).
pub fn digest_of_hash(hash: &str) -> Option<[u8; 32]> {
    if !hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(out)
}

pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(KEY_PREFIX.len() + 8).collect()
}

/// Cheap shape check before any lookup: right prefix, right length, hex.
pub fn looks_valid(secret: &str) -> bool {
    secret.len() == KEY_PREFIX.len() + SECRET_HEX_LEN
        && secret.starts_with(KEY_PREFIX)
        && secret[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_the_stored_hash_in_bytes() {
        let key = generate();
        assert_eq!(digest_of_hash(&key.hash), Some(digest(&key.secret)));
        assert_eq!(digest_of_hash("not hex"), None);
        assert_eq!(digest_of_hash(&key.hash[..62]), None);
        assert_eq!(digest_of_hash(&key.hash.to_uppercase()), None);
    }

    #[test]
    fn generated_keys_are_unique_well_formed_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert!(looks_valid(&a.secret));
        assert_eq!(a.hash, hash(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(!a.hash.contains(&a.secret[KEY_PREFIX.len()..]));
        assert!(a.secret.starts_with(&a.display_prefix));
        assert!(!looks_valid("tally_xyz"));
        assert!(!looks_valid(&a.secret.replace("tally_", "other_")));
    }
}
