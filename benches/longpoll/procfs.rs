//! Readers for the few `/proc` files the benchmark measures with: a process's resident memory,
//! its CPU time, its children (nginx's workers), and the kernel's socket and slab memory.
//!
//! Everything here is a plain synchronous file read: each is a few microseconds and is only done
//! between measurements, never while the clock of one is running.

use std::fs;
use std::io;

pub use nudge_testkit::memory::{Memory, kb_field, memory_of};
pub use nudge_testkit::node::alive;

/// `/proc/PID/stat` counts CPU time in clock ticks of `USER_HZ`, which is 100 on every Linux ABI
/// the benchmark runs on (it is fixed for userspace, whatever `CONFIG_HZ` the kernel was built with).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// `/proc/net/sockstat` counts `mem` in pages; 4 KiB on x86_64 and on the aarch64 builds Debian ships.
pub const PAGE_BYTES: u64 = 4096;

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and parentheses,
/// so the split is at the last `)`): index 0 is field 3 (`state`) of proc(5).
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    Ok(after.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of proc(5), so 11 and 12 here.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(user), Some(system)) => Ok(user + system),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "malformed stat")),
    }
}

/// CPU time of every thread of `pid` in nanoseconds, from `/proc/PID/task/*/schedstat` (its
/// first field is the time on a CPU, at the scheduler's resolution rather than 10 ms ticks);
/// from `/proc/PID/stat` ticks where schedstat is missing. Threads that already exited are not
/// counted, so measure across a window in which the process starts no threads.
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))?;
    let mut total = 0u64;
    for task in tasks {
        let path = task?.path().join("schedstat");
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(cpu_ticks(pid)? * (1e9 / TICKS_PER_SECOND) as u64);
        };
        let on_cpu = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        total += on_cpu
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed schedstat"))?;
    }
    Ok(total)
}

/// Sum of the CPU time of several processes, in nanoseconds.
pub fn cpu_ns_of(pids: &[u32]) -> io::Result<u64> {
    pids.iter().try_fold(0, |sum, &pid| Ok(sum + cpu_ns(pid)?))
}

/// The pids whose parent is `parent` (nginx's workers, for its master).
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<u32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            // ppid is field 4 of proc(5), index 1 here. A process that exits between the
            // directory listing and this read is simply not a child any more.
            stat_fields(pid)
                .ok()
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect();
    found.sort_unstable();
    found
}

/// Kernel memory that sockets hold, system-wide.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct KernelMemory {
    /// `/proc/net/sockstat` `TCP: ... mem P`: pages held by TCP socket buffers (queued data).
    pub tcp_mem_pages: u64,
    /// `/proc/net/sockstat` `TCP: inuse`: TCP sockets in use.
    pub tcp_inuse: u64,
    /// `/proc/meminfo` `Slab`: kernel slab caches, where the socket, inode and file structures of
    /// every connection live. System-wide, so other activity adds noise; 18,000 connections
    /// are far above it.
    pub slab_kb: u64,
}

/// Reads the system-wide socket and slab counters.
pub fn kernel_memory() -> io::Result<KernelMemory> {
    let sockstat = fs::read_to_string("/proc/net/sockstat")?;
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    let tcp = sockstat
        .lines()
        .find_map(|line| line.strip_prefix("TCP:"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no TCP line in sockstat"))?;
    // The line is `inuse 3 orphan 0 tw 2 alloc 5 mem 1`: pairs of name and value.
    let words: Vec<&str> = tcp.split_whitespace().collect();
    let value = |name: &str| {
        words
            .chunks(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair.get(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(KernelMemory {
        tcp_mem_pages: value("mem"),
        tcp_inuse: value("inuse"),
        slab_kb: kb_field(&meminfo, "Slab").unwrap_or(0),
    })
}

/// The 1-minute load average: other work on the machine makes every timing noisy.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The machine, for the report: core count, CPU model, kernel release.
pub fn machine() -> (usize, String, String) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    (cores, model, kernel)
}
