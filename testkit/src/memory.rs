//! A process's resident memory, read from `/proc`: what the tests, the soak and the benches
//! measure nudge (or the bench's floor, or the bench itself) with.

use std::io;

/// Resident memory of one process, from `/proc/PID/status` and `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// `VmRSS`: every resident page the process maps, shared ones counted in full.
    pub rss_kb: u64,
    /// `Pss`: shared pages divided among the processes that map them, so that the sum over
    /// nginx's master and workers counts its shared-memory zone once.
    pub pss_kb: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, other: Memory) -> Memory {
        Memory {
            rss_kb: self.rss_kb + other.rss_kb,
            pss_kb: self.pss_kb + other.pss_kb,
        }
    }
}

/// Finds `name:   1234 kB` in a `/proc` key-value file.
pub fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resident memory of `pid`.
pub fn memory(pid: u32) -> io::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let missing = |what| io::Error::new(io::ErrorKind::InvalidData, format!("no {what} for {pid}"));
    Ok(Memory {
        rss_kb: kb_field(&status, "VmRSS").ok_or_else(|| missing("VmRSS"))?,
        pss_kb: kb_field(&rollup, "Pss").ok_or_else(|| missing("Pss"))?,
    })
}

/// Resident set size of `pid` in bytes (VmRSS), if it can be read.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    memory(pid).ok().map(|m| m.rss_kb * 1024)
}

/// Sum of the resident memory of several processes.
pub fn memory_of(pids: &[u32]) -> io::Result<Memory> {
    pids.iter()
        .try_fold(Memory::default(), |sum, &pid| Ok(sum + memory(pid)?))
}
