//! Starting `phaul-workload` inside a host and observing it through its state file.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::cmd::{describe_command, kill_and_reap, lossy_trim, try_wait_for};
use crate::error::TestbedError;
use crate::netns::Host;
use crate::process::{pid_alive, proc_stat, reap_pid};

/// Default bound for a workload to start (report its pid and publish a state with `counter > 0`).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A reasonable bound for one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for the launcher to print its `PID <n>` line.
const PID_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Drop waits for the launcher to exit once the workload is killed.
const LAUNCHER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

static NONCE_COUNTER: AtomicU64 = AtomicU64::new(1);

/// Read and parse `state_dir/state.json`.
pub fn read_state(state_dir: &Path) -> Result<Value, TestbedError> {
    let path = state_dir.join("state.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| TestbedError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| {
        TestbedError::io(format!("parsing {}", path.display()), std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
}

/// `Ok(())` if a state says `ok: true`; otherwise an error carrying its `detail`.
pub fn state_ok(state: &Value) -> Result<(), TestbedError> {
    if state["ok"] == Value::Bool(true) {
        Ok(())
    } else {
        Err(TestbedError::Workload {
            kind: state["kind"].as_str().unwrap_or("?").to_string(),
            pid: 0,
            detail: format!("self-check failed: {} (state: {state})", state["detail"].as_str().unwrap_or("?")),
        })
    }
}

fn fresh_nonce(avoid: u64) -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    loop {
        let n = (t ^ NONCE_COUNTER.fetch_add(1, Ordering::SeqCst).rotate_left(40)) & (u64::MAX >> 1);
        if n != 0 && n != avoid {
            return n;
        }
    }
}

/// Probe the workload whose state directory is `state_dir` and whose root is `pid`: write a fresh nonce to
/// `state_dir/probe` atomically (tmp + rename), send `SIGUSR1` to `pid`, and wait at most `timeout` for a
/// state answering that nonce, which is returned (check its `ok`, e.g. with [`state_ok`]).
pub fn probe_state_dir(state_dir: &Path, pid: i32, timeout: Duration) -> Result<Value, TestbedError> {
    let previous = read_state(state_dir).ok().and_then(|s| s["nonce"].as_u64()).unwrap_or(0);
    let nonce = fresh_nonce(previous);
    let tmp = state_dir.join(".probe.tmp");
    std::fs::write(&tmp, format!("{nonce}\n"))
        .map_err(|e| TestbedError::io(format!("writing {}", tmp.display()), e))?;
    let probe = state_dir.join("probe");
    std::fs::rename(&tmp, &probe).map_err(|e| TestbedError::io(format!("renaming to {}", probe.display()), e))?;
    kill(Pid::from_raw(pid), Signal::SIGUSR1).map_err(|e| TestbedError::sys(format!("sending SIGUSR1 to {pid}"), e))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(state) = read_state(state_dir) {
            if state["nonce"].as_u64() == Some(nonce) {
                return Ok(state);
            }
        }
        if !pid_alive(pid) {
            return Err(TestbedError::Workload {
                kind: "?".into(),
                pid,
                detail: format!("the process died before answering probe {nonce}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: format!("pid {pid} to answer probe {nonce} in {}", state_dir.display()),
                timeout,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// A running `phaul-workload` started inside a host.
///
/// Dropping it SIGKILLs the workload's root (the original pid, and any pid given to [`Workload::adopt_pid`])
/// if it still exists and is still the same process (same start time), then reaps the launcher.
#[derive(Debug)]
pub struct Workload {
    kind: String,
    state_dir: PathBuf,
    pid: i32,
    /// Processes to kill on drop: (pid, start time) pairs.
    owned: Vec<(i32, u64)>,
    launcher: Child,
    launcher_stderr: Arc<Mutex<Vec<u8>>>,
}

impl Workload {
    /// Start `workload_bin kind --state-dir state_dir args...` inside `host` and wait (up to
    /// [`START_TIMEOUT`]) until it runs: it reported its pid and published a state with `counter > 0`.
    pub fn start(
        host: &Host,
        workload_bin: &Path,
        kind: &str,
        args: &[&str],
        state_dir: &Path,
    ) -> Result<Workload, TestbedError> {
        Self::start_with_timeout(host, workload_bin, kind, args, state_dir, START_TIMEOUT)
    }

    /// [`Workload::start`] with an explicit bound (large memory workloads take a while to fill).
    pub fn start_with_timeout(
        host: &Host,
        workload_bin: &Path,
        kind: &str,
        args: &[&str],
        state_dir: &Path,
        timeout: Duration,
    ) -> Result<Workload, TestbedError> {
        Self::start_prefixed(host, &[], workload_bin, kind, args, state_dir, timeout)
    }

    /// [`Workload::start_with_timeout`] through a command prefix that execs what follows it (such as
    /// `nsenter --mount --target PID --`), so that the workload runs with the prefix's view of the host.
    pub fn start_prefixed(
        host: &Host,
        prefix: &[String],
        workload_bin: &Path,
        kind: &str,
        args: &[&str],
        state_dir: &Path,
        timeout: Duration,
    ) -> Result<Workload, TestbedError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| TestbedError::io(format!("creating state dir {}", state_dir.display()), e))?;
        let mut cmd_args: Vec<&std::ffi::OsStr> = vec![kind.as_ref(), "--state-dir".as_ref(), state_dir.as_os_str()];
        cmd_args.extend(args.iter().map(std::ffi::OsStr::new));
        let mut cmd = match prefix.split_first() {
            None => host.command(workload_bin, cmd_args),
            Some((program, rest)) => {
                let mut all: Vec<&std::ffi::OsStr> = rest.iter().map(std::ffi::OsStr::new).collect();
                all.push(workload_bin.as_os_str());
                all.extend(cmd_args);
                host.command(program, all)
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let command = describe_command(&cmd);
        let mut launcher = cmd.spawn().map_err(|source| TestbedError::Spawn { command: command.clone(), source })?;

        let launcher_stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = launcher.stderr.take() {
            let sink = Arc::clone(&launcher_stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        if let Some(out) = launcher.stdout.take() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let r = BufReader::new(out).read_line(&mut line).map(|_| line);
                let _ = tx.send(r);
            });
        }
        let fail = |launcher: &mut Child, detail: String| {
            kill_and_reap(launcher);
            let stderr = lossy_trim(&launcher_stderr.lock().unwrap_or_else(|p| p.into_inner()));
            TestbedError::Workload {
                kind: kind.to_string(),
                pid: 0,
                detail: format!("{detail}; launcher stderr: {stderr}"),
            }
        };
        let line = match rx.recv_timeout(PID_LINE_TIMEOUT.min(timeout)) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(fail(&mut launcher, format!("reading the pid line of `{command}` failed: {e}"))),
            Err(_) => {
                return Err(fail(
                    &mut launcher,
                    format!("`{command}` printed no `PID <n>` line within {PID_LINE_TIMEOUT:?}"),
                ))
            }
        };
        let pid = match line.trim().strip_prefix("PID ").and_then(|p| p.parse::<i32>().ok()) {
            Some(p) if p > 0 => p,
            _ => return Err(fail(&mut launcher, format!("`{command}` printed {line:?} instead of `PID <n>`"))),
        };
        // If the workload already died (e.g. it failed to start), there is nothing to kill on drop, and
        // `wait_running` reports why from its state file.
        let owned = proc_stat(pid).map(|st| vec![(pid, st.start_time)]).unwrap_or_default();
        let workload = Workload {
            kind: kind.to_string(),
            state_dir: state_dir.to_path_buf(),
            pid,
            owned,
            launcher,
            launcher_stderr,
        };
        workload.wait_running(timeout)?;
        Ok(workload)
    }

    fn wait_running(&self, timeout: Duration) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            let alive = pid_alive(self.pid);
            // Read after the liveness check: a workload that failed publishes why before exiting.
            if let Ok(state) = self.state() {
                if state["counter"].as_u64().is_some_and(|c| c > 0) {
                    return Ok(());
                }
                if !alive && state["ok"] == Value::Bool(false) {
                    return Err(self.error(format!("failed to start: {}", state["detail"].as_str().unwrap_or("?"))));
                }
            }
            if !alive {
                return Err(self.error("exited before publishing its first tick".into()));
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!("workload {} (pid {}) to publish a state with counter > 0", self.kind, self.pid),
                    timeout,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn error(&self, detail: String) -> TestbedError {
        TestbedError::Workload {
            kind: self.kind.clone(),
            pid: self.pid,
            detail: format!("{detail}; launcher stderr: {}", lossy_trim(self.launcher_stderr().as_bytes())),
        }
    }

    /// Host pid of the workload's root (pid 1 of its pid namespace), as started.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Host pid of the launcher (the workload root's parent).
    pub fn launcher_pid(&self) -> u32 {
        self.launcher.id()
    }

    /// The kind given at start.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// What the launcher wrote on stderr so far.
    pub fn launcher_stderr(&self) -> String {
        String::from_utf8_lossy(&self.launcher_stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// The latest published state.
    pub fn state(&self) -> Result<Value, TestbedError> {
        read_state(&self.state_dir)
    }

    /// Probe the original process (see [`probe_state_dir`]).
    pub fn probe(&self, timeout: Duration) -> Result<Value, TestbedError> {
        self.probe_pid(self.pid, timeout)
    }

    /// Probe through `pid`, e.g. the restored root after a migration (see [`probe_state_dir`]).
    pub fn probe_pid(&self, pid: i32, timeout: Duration) -> Result<Value, TestbedError> {
        probe_state_dir(&self.state_dir, pid, timeout)
    }

    /// Wait at most `timeout` for a published `counter > n`; returns that state.
    pub fn wait_counter_above(&self, n: u64, timeout: Duration) -> Result<Value, TestbedError> {
        self.wait_state(&format!("counter > {n}"), timeout, |s| s["counter"].as_u64().is_some_and(|c| c > n))
    }

    /// Wait at most `timeout` for a published state satisfying `pred`; returns that state.
    pub fn wait_state(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(state) = self.state() {
                if pred(&state) {
                    return Ok(state);
                }
            }
            if Instant::now() >= deadline {
                let last = self.state().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Err(TestbedError::Timeout {
                    what: format!("workload {} to publish {what} (last state: {last})", self.kind),
                    timeout,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Also SIGKILL `pid` on drop (e.g. the restored root after a migration), if it is then still the same
    /// process as now.
    pub fn adopt_pid(&mut self, pid: i32) -> std::io::Result<()> {
        let st = proc_stat(pid)?;
        self.owned.push((pid, st.start_time));
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &(pid, start_time) in &self.owned {
            if pid_alive(pid) && proc_stat(pid).is_ok_and(|st| st.start_time == start_time) {
                if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    log::warn!("cannot SIGKILL workload pid {pid}: {e}");
                }
            }
        }
        match try_wait_for(&mut self.launcher, LAUNCHER_EXIT_TIMEOUT) {
            Ok(Some(_)) => {}
            _ => kill_and_reap(&mut self.launcher),
        }
        // Adopted pids may be our children if we are a subreaper; reap them if so (ECHILD otherwise).
        for &(pid, _) in self.owned.iter().skip(1) {
            let _ = reap_pid(pid, Duration::from_millis(500));
        }
    }
}
