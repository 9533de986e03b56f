//! Progress on a terminal: the phase, the round, bytes and rate, on one rewritten line of standard error.
//! Nothing is printed when standard error is not a terminal.

use std::io::Write;
use std::time::Instant;

#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
    dirty: bool,
}

impl Progress {
    /// Shows progress only when `wanted` and standard error is a terminal.
    pub fn new(wanted: bool) -> Progress {
        Progress { enabled: wanted && crate::sys::stderr_is_terminal(), started: Instant::now(), dirty: false }
    }

    pub fn phase(&mut self, text: &str) {
        log::info!("{text}");
        if self.enabled {
            let t = self.started.elapsed().as_secs_f64();
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K[{t:6.1}s] {text}");
            let _ = e.flush();
            self.dirty = true;
        }
    }

    pub fn round(&mut self, round: u32, kind: &str, bytes: u64, secs: f64) {
        let rate = if secs > 0.0 { bytes as f64 / (1u64 << 20) as f64 / secs } else { 0.0 };
        self.phase(&format!(
            "round {round} ({kind}): {:.1} MiB at {rate:.0} MiB/s",
            bytes as f64 / (1u64 << 20) as f64
        ));
    }

    pub fn done(&mut self) {
        if self.enabled && self.dirty {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e);
            self.dirty = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}
