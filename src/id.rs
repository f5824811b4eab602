//! Channel ids: 128 random bits from the OS CSPRNG, written as 22 characters of unpadded
//! base64url. An id is a bearer credential, so it is never logged whole: [`ChannelId::short`]
//! gives a short, non-reversible tag for logs.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Length of an id in its text form.
pub const ID_TEXT_LEN: usize = 22;

/// A channel id: 16 random bytes. `Debug` shows only its [`ChannelId::short`] tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelId([u8; 16]);

impl ChannelId {
    /// A fresh id from the OS CSPRNG.
    pub fn random() -> ChannelId {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        ChannelId(bytes)
    }

    /// Parses the canonical text form; anything else (wrong length, wrong alphabet,
    /// non-canonical trailing bits) is `None`: such an id is simply unknown.
    pub fn parse(text: &str) -> Option<ChannelId> {
        if text.len() != ID_TEXT_LEN {
            return None;
        }
        let mut bytes = [0u8; 16];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(16) => Some(ChannelId(bytes)),
            _ => None,
        }
    }

    /// Picks a shard: the ids are uniformly random, so their first bytes are a fair hash.
    pub(crate) fn shard(&self, mask: usize) -> usize {
        (u64::from_le_bytes(self.0[..8].try_into().unwrap()) as usize) & mask
    }

    /// An 8-hex-digit tag for logs: enough to correlate lines, useless as a credential.
    pub fn short(&self) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(&self.0);
        format!("{:08x}", h.finish() as u32)
    }
}

/// The log tag of a channel id as a client or the main API wrote it: its
/// [`ChannelId::short`], or `malformed`, so that nothing a client sends as an id is logged.
pub fn log_tag(text: &str) -> String {
    ChannelId::parse(text).map_or_else(|| "malformed".to_owned(), |id| id.short())
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ID_TEXT_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut buf)
            .expect("22 bytes hold 16 bytes of base64");
        f.write_str(std::str::from_utf8(&buf[..n]).expect("base64 is ASCII"))
    }
}

impl fmt::Debug for ChannelId {
    // Debug output ends up in logs: never the credential itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({})", self.short())
    }
}

/// Hashes a [`ChannelId`] by folding all of its bytes, 8 at a time, with a rotate and an
/// xor: no mixing rounds, since the ids come from a CSPRNG and are never chosen by a client
/// (lookups of client-chosen ids insert nothing), so no keyed hash is needed either.
#[derive(Clone, Copy, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `ChannelId` hashes as two writes: the array's length prefix (16, as a `usize`),
        // then its 16 bytes. Fold whatever comes in, keeping the common case cheap.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(word);
        }
    }
}

impl BuildHasher for IdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_22_url_safe_chars() {
        for _ in 0..100 {
            let id = ChannelId::random();
            let text = id.to_string();
            assert_eq!(text.len(), ID_TEXT_LEN);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(ChannelId::parse(&text), Some(id));
        }
    }

    #[test]
    fn malformed_ids_are_not_ids() {
        let good = ChannelId::random().to_string();
        assert_eq!(ChannelId::parse(""), None);
        assert_eq!(ChannelId::parse(&good[..21]), None);
        assert_eq!(ChannelId::parse(&format!("{good}A")), None);
        assert_eq!(ChannelId::parse("+++++++++++++++++++++/"), None);
        // The last character carries 2 spare bits: a non-canonical spelling is refused.
        assert_eq!(ChannelId::parse("AAAAAAAAAAAAAAAAAAAAAB"), None);
        assert!(ChannelId::parse("AAAAAAAAAAAAAAAAAAAAAA").is_some());
    }

    #[test]
    fn log_tags_are_short_stable_and_never_the_id() {
        let id = ChannelId::random();
        let text = id.to_string();
        assert_eq!(log_tag(&text), id.short());
        assert_eq!(log_tag(&text).len(), 8);
        assert_eq!(log_tag(&text), log_tag(&text));
        assert_eq!(log_tag("not-an-id"), "malformed");
        // Well-formed (22 base64url characters) but never issued: hashed all the same.
        assert_eq!(log_tag("a-secret-looking-thing").len(), 8);
    }

    #[test]
    fn debug_never_shows_the_id() {
        let id = ChannelId::random();
        assert!(!format!("{id:?}").contains(&id.to_string()));
    }
}
