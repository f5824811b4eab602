//! A stream entry's id, `<ms>-<seq>`: the milliseconds of Redis's clock when the entry was
//! added and a sequence within that millisecond. Ids only grow within one stream's
//! history, which is what lets a node say "everything after this one".

use std::fmt;
use std::str::FromStr;

/// An entry id; `EntryId::ZERO` (`0-0`) comes before every entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// Redis's clock, in milliseconds since the epoch, when the entry was added.
    pub ms: u64,
    /// The entry's place within that millisecond.
    pub seq: u64,
}

impl EntryId {
    /// Before every entry: reading "after `0-0`" reads the whole stream.
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = String;

    fn from_str(text: &str) -> Result<EntryId, String> {
        let bad = || format!("{text:?} is not a stream entry id like 1733212345678-0");
        let (ms, seq) = text.split_once('-').ok_or_else(bad)?;
        let number = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<u64>().map_err(|_| bad())
        };
        Ok(EntryId {
            ms: number(ms)?,
            seq: number(seq)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_write_and_order_like_redis() {
        let a: EntryId = "1733212345678-0".parse().unwrap();
        let b: EntryId = "1733212345678-12".parse().unwrap();
        let c: EntryId = "1733212345679-0".parse().unwrap();
        assert!(EntryId::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1733212345678-12");
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "1-2-3",
            "a-1",
            "+1-2",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<EntryId>().is_err(), "{bad:?}");
        }
    }
}
