//! Sampling a process the benchmark started itself (the TLS and baseline variants start `phaul serve` and `phaul
//! migrate` without `Lab::migrate`): peak RSS and CPU time of the process itself from /proc while it runs, and its
//! CPU times once more after it exited but before it is reaped (`waitid(WNOWAIT)`), the children it reaped (CRIU)
//! apart. The same method as the testbed's `MigrateOptions::sample_usage`, whose sampler is private to
//! `Lab::migrate`; the figures land in the testbed's [`ProcUsage`] so both paths are reported alike.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use phaul_testbed::ProcUsage;

/// How often /proc is read (checking for the exit, a cheap `waitid`, happens at every poll).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// `VmHWM` of a live process (KiB), unless it is still `nsenter` (whose image the program replaces).
fn read_hwm_kib(pid: u32) -> Option<u64> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() == "nsenter" {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// utime, stime, cutime and cstime of `/proc/PID/stat`, in seconds (a zombie still has them).
fn parse_cpu(stat: &str, tick: f64) -> Option<[f64; 4]> {
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm the state is index 0; utime, stime, cutime and cstime are fields 14-17 of the line.
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).map(|v| v as f64 / tick);
    Some([get(11)?, get(12)?, get(13)?, get(14)?])
}

fn read_cpu(pid: u32, u: &mut ProcUsage) -> bool {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().filter(|t| *t > 0).unwrap_or(100);
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    match parse_cpu(&text, tick as f64) {
        Some([ut, st, cut, cst]) => {
            (u.user_s, u.sys_s, u.children_user_s, u.children_sys_s) = (ut, st, cut, cst);
            true
        }
        None => false,
    }
}

/// Samples our child `pid` until it has exited (not reaping it) or `limit` passes.
pub fn sampler(pid: u32, every: Duration, limit: Duration) -> JoinHandle<ProcUsage> {
    std::thread::spawn(move || {
        let mut u = ProcUsage::default();
        let deadline = Instant::now() + limit;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        let mut next_sample = Instant::now();
        loop {
            match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => {
                    u.final_read = read_cpu(pid, &mut u);
                    break;
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
            if Instant::now() >= next_sample {
                if let Some(hwm) = read_hwm_kib(pid) {
                    u.peak_rss_kib = u.peak_rss_kib.max(hwm);
                }
                if read_cpu(pid, &mut u) {
                    u.samples += 1;
                }
                next_sample = Instant::now() + SAMPLE_EVERY.max(every);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(every);
        }
        u
    })
}

/// A pipe read to its end by a thread; what was read so far can be looked at any time.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn start(mut r: impl Read + Send + 'static) -> (Captured, JoinHandle<()>) {
        let c = Captured::default();
        let sink = c.clone();
        let h = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });
        (c, h)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// A started child with its output captured and, optionally, a usage sampler.
pub struct Watched {
    child: Option<Child>,
    pub stdout: Captured,
    pub stderr: Captured,
    readers: Vec<JoinHandle<()>>,
    sampler: Option<JoinHandle<ProcUsage>>,
}

/// How a [`Watched`] child ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub usage: Option<ProcUsage>,
    /// It ran past its bound and was killed.
    pub timed_out: bool,
}

impl Watched {
    /// Takes over `child` (its stdout/stderr piped or null), sampling it every `poll` when `sample` is set.
    pub fn new(mut child: Child, sample: bool, poll: Duration, limit: Duration) -> Watched {
        let mut readers = Vec::new();
        let stdout = match child.stdout.take() {
            Some(o) => {
                let (c, h) = Captured::start(o);
                readers.push(h);
                c
            }
            None => Captured::default(),
        };
        let stderr = match child.stderr.take() {
            Some(e) => {
                let (c, h) = Captured::start(e);
                readers.push(h);
                c
            }
            None => Captured::default(),
        };
        let sampler = sample.then(|| sampler(child.id(), poll, limit));
        Watched { child: Some(child), stdout, stderr, readers, sampler }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it has exited (without reaping it).
    pub fn exited(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        !matches!(waitid(Id::Pid(Pid::from_raw(self.id() as i32)), flags), Ok(WaitStatus::StillAlive))
    }

    /// Waits at most `timeout` (then kills it), checking every `poll`; reaps it only once the sampler has read its
    /// final figures.
    pub fn finish(mut self, timeout: Duration, poll: Duration) -> std::io::Result<Finished> {
        let mut child = self.child.take().ok_or_else(|| std::io::Error::other("already finished"))?;
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            let may_reap = !matches!(&self.sampler, Some(s) if !s.is_finished());
            match if may_reap { child.try_wait()? } else { None } {
                Some(s) => break s,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    timed_out = true;
                    break child.wait()?;
                }
                None => std::thread::sleep(poll),
            }
        };
        // A process the child started may still hold its pipes: read what is there, bounded.
        let bound = Instant::now() + Duration::from_secs(5);
        for h in std::mem::take(&mut self.readers) {
            while !h.is_finished() && Instant::now() < bound {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        let usage = self.sampler.take().and_then(|h| h.join().ok());
        Ok(Finished { status, stdout: self.stdout.text(), stderr: self.stderr.text(), usage, timed_out })
    }
}

impl Drop for Watched {
    /// A child not finished (an error path) is killed and reaped, bounded.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fields_are_counted_after_the_comm() {
        let line = "1234 (a) b (c)) S 99 1234 1234 0 -1 4194560 100 0 0 0 150 50 20 10 20 0 1 0 987654 1000 10";
        assert_eq!(parse_cpu(line, 100.0), Some([1.5, 0.5, 0.2, 0.1]));
        assert_eq!(parse_cpu("garbage", 100.0), None);
    }

    #[test]
    fn a_child_is_sampled_and_its_output_kept() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"]);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let child = cmd.spawn().expect("sh runs");
        let w = Watched::new(child, true, Duration::from_millis(1), Duration::from_secs(60));
        let f = w.finish(Duration::from_secs(60), Duration::from_millis(1)).expect("finishes");
        assert!(f.status.success() && !f.timed_out);
        assert_eq!((f.stdout.trim(), f.stderr.trim()), ("out", "err"));
        let u = f.usage.expect("sampled");
        assert!(u.final_read, "{u:?}");
    }
}
