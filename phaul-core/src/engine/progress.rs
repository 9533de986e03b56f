//! Progress on a terminal: the phase, the round, bytes and rate, on one rewritten line of standard error.
//! Nothing is printed when standard error is not a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
    dirty: bool,
}

impl Progress {
    /// Shows progress only when `wanted` and standard error is a terminal.
    /// Plugins' own progress reports (`HostServices::progress`) are shown on the same line, at most ten times
    /// a second, for as long as this lives.
    pub fn new(wanted: bool) -> Progress {
        let p = Progress { enabled: wanted && crate::sys::stderr_is_terminal(), started: Instant::now(), dirty: false };
        if p.enabled {
            let started = p.started;
            let last = std::sync::Mutex::new(None::<Instant>);
            crate::plugins::services::set_progress_sink(Some(Box::new(move |plugin, what, done, total| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                let complete = total > 0 && done >= total;
                if !complete && last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                    return;
                }
                *last = Some(Instant::now());
                let of = if total > 0 { format!(" of {total}") } else { String::new() };
                let t = started.elapsed().as_secs_f64();
                let mut e = std::io::stderr().lock();
                let _ = write!(e, "\r\x1b[K[{t:6.1}s] {plugin}: {what} {done}{of}");
                let _ = e.flush();
            })));
        }
        p
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
        if self.enabled {
            crate::plugins::services::set_progress_sink(None);
        }
        self.done();
    }
}
