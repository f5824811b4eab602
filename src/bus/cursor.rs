//! Where a node is in the stream, and what an interruption cost it: the pure part of the
//! reader, kept apart from Redis so that every row of the gap table is tested directly.
//!
//! A node remembers the last entry it applied (`L`), how many entries the stream had ever
//! been given up to and including `L` (`N`, from `XINFO`'s `entries-added`), and the
//! stream's epoch. When it reconnects, Redis tells it the epoch, the stream's last id `G`,
//! its `entries-added` `E`, its length, its first entry `F`, and the largest id ever
//! `XDEL`eted; the node also asks whether `L` is still there. Trimming removes entries
//! from the head of the stream (and, on Redis 7.0, does not move `max-deleted-entry-id`),
//! so "were entries after `L` trimmed?" is answered by counting: `E − N` entries were
//! added after `L`, and if fewer than that are left after it, some were trimmed.

use super::entry_id::EntryId;
use crate::metrics::gap;

/// The reader's place in the stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    /// The last entry applied; `None` before the first connection (start at the end).
    pub last: Option<EntryId>,
    /// `entries-added` up to and including `last`; `None` when not known (then a missing
    /// `last` is taken as trimmed: wake all rather than guess).
    pub count: Option<u64>,
    /// The stream's epoch, as last seen.
    pub epoch: Option<String>,
    /// While catching up after a resume: the stream's last id and `entries-added` at that
    /// moment; applying that entry makes `count` exact again.
    sync: Option<(EntryId, u64)>,
}

/// What `XINFO STREAM` said (`None` for the whole when there is no stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StreamInfo {
    pub length: u64,
    pub last_generated: EntryId,
    pub entries_added: u64,
    pub first_entry: Option<EntryId>,
    /// Moved by `XDEL` (not by trimming on Redis 7.0); `0-0` if nothing was deleted.
    pub max_deleted: EntryId,
}

/// How a (re)connection resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resumed {
    /// The node's first connection, at the stream's end.
    Fresh,
    /// A gap, and how it is repaired (a pair of [`gap`]).
    Gap((&'static str, &'static str)),
}

impl Cursor {
    /// Reads a position that [`Cursor::position`] wrote: `<id>[/<count>][@<epoch>]`.
    pub fn from_position(text: &str) -> Result<Cursor, String> {
        let (rest, epoch) = match text.split_once('@') {
            Some((rest, epoch)) if !epoch.is_empty() => (rest, Some(epoch.to_owned())),
            Some(_) => return Err(format!("{text:?}: an empty epoch")),
            None => (text, None),
        };
        let (id, count) = match rest.split_once('/') {
            Some((id, count)) => (
                id,
                Some(
                    count
                        .parse::<u64>()
                        .map_err(|_| format!("{text:?}: the count is not a number"))?,
                ),
            ),
            None => (rest, None),
        };
        Ok(Cursor {
            last: Some(id.parse()?),
            count,
            epoch,
            sync: None,
        })
    }

    /// The position as text, `None` before the first connection.
    pub fn position(&self) -> Option<String> {
        let mut text = self.last?.to_string();
        if let Some(count) = self.count {
            text.push_str(&format!("/{count}"));
        }
        if let Some(epoch) = &self.epoch {
            text.push_str(&format!("@{epoch}"));
        }
        Some(text)
    }

    /// Records that entry `id` was applied (entries come in id order).
    pub fn applied(&mut self, id: EntryId) {
        self.last = Some(id);
        self.count = self.count.map(|n| n + 1);
        if let Some((until, added)) = self.sync {
            if id == until {
                self.count = Some(added);
                self.sync = None;
            } else if id > until {
                // The entry to sync on was deleted before it was read: the count stays
                // unknown until the next resume.
                self.sync = None;
            }
        }
    }

    /// Works out, from what Redis says now, what the interruption cost and where to read
    /// on from. `last_present`: whether entry `L` is still in the stream (asked only when
    /// it matters: see [`Cursor::needs_presence`]).
    pub fn resume(
        &self,
        epoch: &str,
        info: Option<&StreamInfo>,
        last_present: bool,
    ) -> (Cursor, Resumed) {
        let at = |last: EntryId, count: Option<u64>| Cursor {
            last: Some(last),
            count,
            epoch: Some(epoch.to_owned()),
            sync: info.map(|i| (i.last_generated, i.entries_added)),
        };
        let end = || match info {
            Some(i) => at(i.last_generated, Some(i.entries_added)),
            None => at(EntryId::ZERO, Some(0)),
        };
        let Some(last) = self.last else {
            return (end(), Resumed::Fresh);
        };
        if self.epoch.as_deref().is_some_and(|e| e != epoch) {
            // Another stream altogether: read it from its start.
            return (at(EntryId::ZERO, Some(0)), Resumed::Gap(gap::RESET));
        }
        let Some(info) = info else {
            if last == EntryId::ZERO {
                // There never was an entry, and there still is none.
                return (end(), Resumed::Gap(gap::REPLAYED));
            }
            // The stream this node read from is gone, the epoch beside it is not.
            return (at(EntryId::ZERO, Some(0)), Resumed::Gap(gap::DIVERGED));
        };
        let resumed =
            if info.last_generated < last || self.count.is_some_and(|n| info.entries_added < n) {
                // Redis has not got as far as this node: entries it applied are not there.
                return (end(), Resumed::Gap(gap::DIVERGED));
            } else if last_present {
                if info.max_deleted > last {
                    gap::TRIMMED
                } else {
                    gap::REPLAYED
                }
            } else if last != EntryId::ZERO
                && info.first_entry.is_some_and(|f| f <= last)
                && info.max_deleted < last
            {
                // `L` should be there (the stream starts before it) and was never deleted.
                gap::DIVERGED
            } else {
                // `L` was trimmed: so were entries after it, unless every entry added after
                // it is still there.
                match self.count {
                    Some(n) if info.entries_added - n <= info.length => gap::REPLAYED,
                    _ => gap::TRIMMED,
                }
            };
        let count = if resumed == gap::REPLAYED {
            self.count
        } else {
            None
        };
        (at(last, count), Resumed::Gap(resumed))
    }

    /// Whether [`Cursor::resume`] needs to know if entry `L` is still there.
    pub fn needs_presence(&self) -> Option<EntryId> {
        self.last.filter(|l| *l != EntryId::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> EntryId {
        EntryId { ms, seq: 0 }
    }

    fn cursor(last: u64, count: u64) -> Cursor {
        Cursor {
            last: Some(id(last)),
            count: Some(count),
            epoch: Some("e".into()),
            sync: None,
        }
    }

    fn info(length: u64, first: Option<u64>, last: u64, added: u64) -> StreamInfo {
        StreamInfo {
            length,
            last_generated: id(last),
            entries_added: added,
            first_entry: first.map(id),
            max_deleted: EntryId::ZERO,
        }
    }

    #[test]
    fn a_fresh_node_starts_at_the_end() {
        let (c, r) = Cursor::default().resume("e", Some(&info(3, Some(10), 30, 3)), false);
        assert_eq!(r, Resumed::Fresh);
        assert_eq!((c.last, c.count), (Some(id(30)), Some(3)));
        let (c, r) = Cursor::default().resume("e", None, false);
        assert_eq!(
            (c.last, c.count, r),
            (Some(EntryId::ZERO), Some(0), Resumed::Fresh)
        );
    }

    #[test]
    fn every_row_of_the_gap_table() {
        let gap_of = |c: &Cursor, epoch: &str, i: Option<StreamInfo>, present: bool| match c
            .resume(epoch, i.as_ref(), present)
            .1
        {
            Resumed::Gap(pair) => pair,
            Resumed::Fresh => panic!("not fresh"),
        };
        // L=20 was entry #2; entries 10, 20, 30, 40 added.
        let c = cursor(20, 2);
        // Nothing lost: L is there, two entries after it.
        assert_eq!(
            gap_of(&c, "e", Some(info(4, Some(10), 40, 4)), true),
            gap::REPLAYED
        );
        // L trimmed, but both entries after it are left.
        assert_eq!(
            gap_of(&c, "e", Some(info(2, Some(30), 40, 4)), false),
            gap::REPLAYED
        );
        // L and 30 trimmed: one of the two entries after L is gone.
        assert_eq!(
            gap_of(&c, "e", Some(info(1, Some(40), 40, 4)), false),
            gap::TRIMMED
        );
        // Everything trimmed (an empty stream) after entries were added.
        assert_eq!(
            gap_of(&c, "e", Some(info(0, None, 40, 4)), false),
            gap::TRIMMED
        );
        // An entry after L deleted with XDEL.
        let mut deleted = info(3, Some(10), 40, 4);
        deleted.max_deleted = id(30);
        assert_eq!(gap_of(&c, "e", Some(deleted), true), gap::TRIMMED);
        // A new epoch: Redis restarted empty, or FLUSHALL.
        assert_eq!(
            gap_of(&c, "f", Some(info(1, Some(50), 50, 1)), false),
            gap::RESET
        );
        assert_eq!(gap_of(&c, "f", None, false), gap::RESET);
        // Redis is behind this node: a failover to a replica that missed L.
        assert_eq!(
            gap_of(&c, "e", Some(info(1, Some(10), 10, 1)), false),
            gap::DIVERGED
        );
        // ... and took new entries since: L should be there and never was deleted.
        assert_eq!(
            gap_of(&c, "e", Some(info(2, Some(10), 50, 2)), false),
            gap::DIVERGED
        );
        // The stream was deleted, its epoch kept.
        assert_eq!(gap_of(&c, "e", None, false), gap::DIVERGED);
        // Without a count, a trimmed L is taken as a trimmed gap (never guessed lossless).
        let mut no_count = c.clone();
        no_count.count = None;
        assert_eq!(
            gap_of(&no_count, "e", Some(info(2, Some(30), 40, 4)), false),
            gap::TRIMMED
        );
        // A node that never saw an entry, on a stream that still has none.
        let empty = cursor(0, 0);
        assert_eq!(gap_of(&empty, "e", None, false), gap::REPLAYED);
        assert_eq!(
            gap_of(&empty, "e", Some(info(1, Some(5), 5, 1)), false),
            gap::REPLAYED
        );
        // ... or whose entries were all trimmed before it read them.
        assert_eq!(
            gap_of(&empty, "e", Some(info(0, None, 5, 1)), false),
            gap::TRIMMED
        );
    }

    #[test]
    fn the_count_follows_the_entries_and_syncs_after_a_resume() {
        let c = cursor(20, 2);
        // Replayed: reads on from L with its count; the sync point is the stream's end.
        let (mut c, _) = c.resume("e", Some(&info(4, Some(10), 40, 4)), true);
        c.applied(id(30));
        c.applied(id(40));
        assert_eq!((c.last, c.count), (Some(id(40)), Some(4)));
        // A trimmed gap loses the count; applying the entry at the sync point restores it.
        let (mut c, _) = cursor(20, 2).resume("e", Some(&info(1, Some(40), 40, 4)), false);
        assert_eq!(c.count, None);
        c.applied(id(40));
        assert_eq!(c.count, Some(4));
        assert_eq!(c.position().unwrap(), "40-0/4@e");
        assert_eq!(
            Cursor::from_position("40-0/4@e").unwrap().position(),
            c.position()
        );
    }

    #[test]
    fn positions_read_back_or_are_refused() {
        for good in ["1-0", "1-0/3", "1-0@ab", "1-0/3@ab"] {
            assert_eq!(
                Cursor::from_position(good).unwrap().position().unwrap(),
                good
            );
        }
        for bad in ["", "x", "1-0/x", "1-0@", "1-0/3@", "/3@e"] {
            assert!(Cursor::from_position(bad).is_err(), "{bad:?}");
        }
    }
}
