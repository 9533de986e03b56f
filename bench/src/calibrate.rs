//! How much first-touching memory costs on this machine. On a virtual machine whose balloon reports free pages to
//! the hypervisor, memory that was free for a while must be faulted in again on the host, while memory freed a
//! moment ago is reused at once. phaul restores on B while the frozen source still holds its memory on A (the
//! source is only killed once B confirms), so when both "hosts" share one machine its restore gets the former kind;
//! bare CRIU kills the source first and its restore reuses the freed pages. This measures the difference.

use std::time::Instant;

use serde::Serialize;

/// Times to touch one byte per page of a fresh `size_mib` MiB buffer, in three situations.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryCalibration {
    pub size_mib: u64,
    /// The first buffer.
    pub first_ms: f64,
    /// A second buffer while the first is still held.
    pub while_held_ms: f64,
    /// A third buffer right after the second was freed (it reuses the second's pages).
    pub just_freed_ms: f64,
}

fn touch(bytes: usize) -> (Vec<u8>, f64) {
    let t = Instant::now();
    // Zeroed allocations of this size are fresh anonymous mappings: each page is faulted in by the write below.
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    (v, t.elapsed().as_secs_f64() * 1000.0)
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .map(|kib: u64| kib / 1024)
        .unwrap_or(0)
}

/// Measures with `size_mib`; none when the machine has not got three times that available (plus 1 GiB).
pub fn measure(size_mib: u64) -> Option<MemoryCalibration> {
    if size_mib == 0 || mem_available_mib() < 3 * size_mib + 1024 {
        return None;
    }
    let bytes = usize::try_from(size_mib << 20).ok()?;
    let (first, first_ms) = touch(bytes);
    let (second, while_held_ms) = touch(bytes);
    drop(second);
    let (third, just_freed_ms) = touch(bytes);
    drop(third);
    drop(first);
    Some(MemoryCalibration { size_mib, first_ms, while_held_ms, just_freed_ms })
}
