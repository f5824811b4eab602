//! The hub's state as bytes: what `--state-dir` keeps and what an upgrade hands over. A
//! small binary format, because a million channels must be written in well under a second:
//!
//! ```text
//! "NUDGESNP"  version: u16  taken_at_ms: u64  bus_position: string?
//! channels: u32 × { id, topics: u16 × string, subject: string?, stream_type: string?,
//!                   ttl_ms: u64, retry_timeout_ms: u64, max_retries: u32, reconnects: u32,
//!                   pending: u8 (bit 0 set, bit 1 unpositioned), max_position: u64,
//!                   expires_at_ms: u64 }
//! positions: u32 × { topic: string, position: u64 }
//! not_live: seed: u64, u32 × { hash: u64, age_ms: u64 }        (version 2 on)
//! checksum: u64 (FNV-1a of every byte before it)
//! ```
//!
//! Integers are little-endian; a string is a `u32` length and UTF-8 bytes; `?` is a byte
//! 0 or 1 before the value. Version 1 (without the not-live ids) is still read: a node
//! upgraded from a binary that wrote it, or restoring its file, starts with no not-live
//! ids, as before. Anything else — another magic, a later version, a truncated or altered
//! file — is refused with the reason, never half read.

use std::time::Duration;

use crate::hub::{ChannelState, HubState, NotLiveState};

const MAGIC: &[u8; 8] = b"NUDGESNP";
/// The version this build writes; it reads this one and version 1.
pub const VERSION: u16 = 2;

/// A hub state and, with a bus, the position it goes with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The hub's channels and positions.
    pub hub: HubState,
    /// `Bus::position()` taken before the hub's state (see `bus`).
    pub bus_position: Option<String>,
}

/// Why bytes are not a snapshot this build can read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not a nudge state file at all.
    #[error("not a nudge state file")]
    Foreign,
    /// Written by a later version of nudge.
    #[error("format version {0}, this build reads versions 1 to {VERSION}")]
    Version(u16),
    /// Cut short.
    #[error("truncated")]
    Truncated,
    /// Every byte is there, but not the ones that were written.
    #[error("checksum mismatch: the file was altered or half written")]
    Checksum,
    /// A string that is not UTF-8, a flag that is not 0 or 1.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// Encodes a snapshot.
pub fn encode(s: &Snapshot) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + s.hub.channels.len() * 96));
    w.0.extend_from_slice(MAGIC);
    w.u16(VERSION);
    w.u64(s.hub.taken_at_ms);
    w.opt(s.bus_position.as_deref());
    w.u32(s.hub.channels.len() as u32);
    for c in &s.hub.channels {
        w.str(&c.id);
        w.u16(c.topics.len() as u16);
        for t in &c.topics {
            w.str(t);
        }
        w.opt(c.subject.as_deref());
        w.opt(c.stream_type.as_deref());
        w.u64(c.ttl.as_millis() as u64);
        w.u64(c.retry_timeout.as_millis() as u64);
        w.u32(c.max_retries);
        w.u32(c.reconnects);
        let (set, unpositioned, max_position) = c.pending;
        w.0.push(u8::from(set) | u8::from(unpositioned) << 1);
        w.u64(max_position);
        w.u64(c.expires_at_ms);
    }
    w.u32(s.hub.positions.len() as u32);
    for (topic, position) in &s.hub.positions {
        w.str(topic);
        w.u64(*position);
    }
    w.u64(s.hub.not_live.seed);
    w.u32(s.hub.not_live.ids.len() as u32);
    for (hash, age_ms) in &s.hub.not_live.ids {
        w.u64(*hash);
        w.u64(*age_ms);
    }
    let sum = fnv1a(&w.0);
    w.u64(sum);
    w.0
}

/// Decodes a snapshot, all or nothing.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::Foreign);
    }
    let mut r = Reader(&bytes[MAGIC.len()..]);
    let version = r.u16()?;
    if !(1..=VERSION).contains(&version) {
        return Err(SnapshotError::Version(version));
    }
    if bytes.len() < MAGIC.len() + 2 + 8 {
        return Err(SnapshotError::Truncated);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if fnv1a(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
        // A file cut short fails here too; say which when it is plain.
        return Err(match decode_body(&body[MAGIC.len() + 2..], version) {
            Err(SnapshotError::Truncated) => SnapshotError::Truncated,
            _ => SnapshotError::Checksum,
        });
    }
    let snapshot = decode_body(&body[MAGIC.len() + 2..], version)?;
    Ok(snapshot)
}

fn decode_body(bytes: &[u8], version: u16) -> Result<Snapshot, SnapshotError> {
    let mut r = Reader(bytes);
    let taken_at_ms = r.u64()?;
    let bus_position = r.opt()?;
    let n = r.u32()? as usize;
    // Each channel takes at least 50 bytes: a count no file could hold is refused before
    // anything is allocated for it.
    if n > r.0.len() / 50 {
        return Err(SnapshotError::Truncated);
    }
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.str()?;
        let topics = (0..r.u16()?).map(|_| r.str()).collect::<Result<_, _>>()?;
        let subject = r.opt()?;
        let stream_type = r.opt()?;
        let ttl = Duration::from_millis(r.u64()?);
        let retry_timeout = Duration::from_millis(r.u64()?);
        let max_retries = r.u32()?;
        let reconnects = r.u32()?;
        let flags = r.u8()?;
        if flags > 3 {
            return Err(SnapshotError::Malformed("pending flags"));
        }
        let max_position = r.u64()?;
        channels.push(ChannelState {
            id,
            topics,
            subject,
            stream_type,
            ttl,
            retry_timeout,
            max_retries,
            reconnects,
            pending: (flags & 1 != 0, flags & 2 != 0, max_position),
            expires_at_ms: r.u64()?,
        });
    }
    let n = r.u32()? as usize;
    if n > r.0.len() / 12 {
        return Err(SnapshotError::Truncated);
    }
    let mut positions = Vec::with_capacity(n);
    for _ in 0..n {
        positions.push((r.str()?, r.u64()?));
    }
    let mut not_live = NotLiveState::default();
    if version >= 2 {
        not_live.seed = r.u64()?;
        let n = r.u32()? as usize;
        if n > r.0.len() / 16 {
            return Err(SnapshotError::Truncated);
        }
        not_live.ids = (0..n)
            .map(|_| Ok((r.u64()?, r.u64()?)))
            .collect::<Result<_, _>>()?;
    }
    if !r.0.is_empty() {
        return Err(SnapshotError::Malformed("bytes after the last section"));
    }
    Ok(Snapshot {
        hub: HubState {
            taken_at_ms,
            channels,
            positions,
            not_live,
        },
        bus_position,
    })
}

/// FNV-1a, 64 bits: catches a torn or altered file (it is no defence against an attacker,
/// who could as well write a valid file: the state directory must be the node's alone).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<String, SnapshotError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| SnapshotError::Malformed("a string is not UTF-8"))
    }
    fn opt(&mut self) -> Result<Option<String>, SnapshotError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err(SnapshotError::Malformed("an optional string's flag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            hub: HubState {
                taken_at_ms: 1_733_212_345_678,
                channels: vec![ChannelState {
                    id: "Q3xyzQ3xyzQ3xyzQ3xyzQ3".into(),
                    topics: vec!["box:9".into(), "user:42".into()],
                    subject: Some("user:42".into()),
                    stream_type: None,
                    ttl: Duration::from_secs(600),
                    retry_timeout: Duration::from_secs(60),
                    max_retries: 10,
                    reconnects: 2,
                    pending: (true, false, 77),
                    expires_at_ms: 1_733_212_945_678,
                }],
                positions: vec![("user:42".into(), 77)],
                not_live: NotLiveState {
                    seed: 0x0123_4567_89ab_cdef,
                    ids: vec![(0xdead_beef, 59_000), (0xfeed_f00d, 3)],
                },
            },
            bus_position: Some("1733212345678-0/42@5f3a".into()),
        }
    }

    #[test]
    fn a_snapshot_reads_back_the_same() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let empty = Snapshot::default();
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused_without_a_panic() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        for at in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[at] ^= 0x20;
            assert!(decode(&altered).is_err(), "byte {at} flipped");
        }
        assert_eq!(
            decode(&bytes[..bytes.len() - 3]),
            Err(SnapshotError::Truncated)
        );
    }

    #[test]
    fn foreign_and_other_version_files_say_so() {
        assert_eq!(decode(b"{\"channels\":[]}"), Err(SnapshotError::Foreign));
        assert_eq!(decode(b""), Err(SnapshotError::Foreign));
        let mut other = encode(&sample());
        other[8..10].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(decode(&other), Err(SnapshotError::Version(3)));
        // Random bytes after a right header: refused, never a panic or a huge allocation.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut junk = MAGIC.to_vec();
            junk.extend_from_slice(&VERSION.to_le_bytes());
            for _ in 0..(rng % 200) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                junk.push(rng as u8);
            }
            assert!(decode(&junk).is_err());
        }
    }

    #[test]
    fn a_version_1_file_is_read_with_no_not_live_ids() {
        // Version 1 is version 2 without the not-live section (a seed and a count here).
        let mut s = sample();
        s.hub.not_live = NotLiveState::default();
        let v2 = encode(&s);
        let mut v1 = v2[..v2.len() - 8 - 12].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let sum = fnv1a(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(decode(&v1).unwrap(), s);
        // ...and a version 1 file with the section is refused, never half read.
        let mut extra = v2[..v2.len() - 8].to_vec();
        extra[8..10].copy_from_slice(&1u16.to_le_bytes());
        let sum = fnv1a(&extra);
        extra.extend_from_slice(&sum.to_le_bytes());
        assert!(matches!(decode(&extra), Err(SnapshotError::Malformed(_))));
    }

    #[test]
    fn a_channel_with_two_topics_and_a_subject_takes_about_a_hundred_bytes() {
        let mut s = sample();
        let one = s.hub.channels[0].clone();
        s.hub.channels = vec![one; 100_000];
        let bytes = encode(&s);
        assert!(bytes.len() < 110 * 100_000, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).unwrap().hub.channels.len(), 100_000);
    }
}
