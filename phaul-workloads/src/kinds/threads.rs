//! `threads`: N worker threads, each incrementing its own counter every ~10 ms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::runner::Workload;

const WORKER_PERIOD: Duration = Duration::from_millis(10);
/// A probe gives slow threads this long to show progress (probes may come back to back).
const PROGRESS_GRACE: Duration = Duration::from_millis(500);

/// N threads with one counter each.
#[derive(Debug)]
pub struct Threads {
    counters: Arc<Vec<AtomicU64>>,
    handles: Vec<JoinHandle<()>>,
    last_probe: Option<Vec<u64>>,
    stop: Arc<AtomicBool>,
}

impl Threads {
    /// Start `n` worker threads.
    pub fn start(n: usize) -> Result<Threads, String> {
        if n == 0 {
            return Err("the threads workload needs at least one thread".into());
        }
        let counters: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let counters = Arc::clone(&counters);
            let stop = Arc::clone(&stop);
            let h = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        counters[i].fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(WORKER_PERIOD);
                    }
                })
                .map_err(|e| format!("cannot spawn worker thread {i}: {e}"))?;
            handles.push(h);
        }
        Ok(Threads { counters, handles, last_probe: None, stop })
    }

    fn snapshot(&self) -> Vec<u64> {
        self.counters.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }
}

/// Which threads have not progressed: beyond `previous` if given, beyond zero otherwise.
pub fn stalled(previous: Option<&[u64]>, now: &[u64]) -> Vec<usize> {
    now.iter()
        .enumerate()
        .filter(|(i, &v)| match previous {
            Some(prev) => v <= prev.get(*i).copied().unwrap_or(0),
            None => v == 0,
        })
        .map(|(i, _)| i)
        .collect()
}

impl Workload for Threads {
    fn kind(&self) -> &'static str {
        "threads"
    }

    fn check(&mut self) -> Result<(), String> {
        let dead: Vec<usize> =
            self.handles.iter().enumerate().filter(|(_, h)| h.is_finished()).map(|(i, _)| i).collect();
        if !dead.is_empty() {
            return Err(format!("worker threads {dead:?} have exited"));
        }
        let deadline = Instant::now() + PROGRESS_GRACE;
        let mut now = self.snapshot();
        let mut stuck = stalled(self.last_probe.as_deref(), &now);
        while !stuck.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            now = self.snapshot();
            stuck = stalled(self.last_probe.as_deref(), &now);
        }
        self.last_probe = Some(now);
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(format!("worker threads {stuck:?} made no progress since the previous probe"))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("threads".into(), Value::from(self.counters.len()));
        m.insert("thread_counters".into(), Value::from(self.snapshot()));
        m
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_logic() {
        assert_eq!(stalled(None, &[1, 0, 3]), vec![1]);
        assert_eq!(stalled(Some(&[1, 2, 3]), &[2, 2, 4]), vec![1]);
        assert!(stalled(Some(&[1, 2]), &[2, 3]).is_empty());
    }

    #[test]
    fn threads_progress() {
        let mut t = Threads::start(3).expect("start");
        std::thread::sleep(Duration::from_millis(50));
        assert!(t.check().is_ok());
        assert!(t.check().is_ok(), "back-to-back probes must still pass");
        assert_eq!(t.fields()["thread_counters"].as_array().map(|a| a.len()), Some(3));
    }
}
