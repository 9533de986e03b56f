//! Running LXC's own tools, bounded in time. Their output goes to files, never pipes: `lxc-start` and
//! `lxc-checkpoint -r` leave a monitor process behind that inherits the descriptors, so a pipe would not end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phaul_abi::{PluginError, PluginResult};

/// What a finished tool printed.
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// The last `max` bytes of a text, on a character boundary.
pub fn tail(s: &str, max: usize) -> &str {
    let s = s.trim_end();
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A runner that keeps each tool's output in `dir`.
pub struct Tools {
    dir: PathBuf,
    /// Prepended to `PATH` (where phaul's `criu` for liblxc is).
    path_prefix: Option<PathBuf>,
}

impl Tools {
    pub fn new(dir: &Path) -> Tools {
        Tools { dir: dir.to_path_buf(), path_prefix: None }
    }

    pub fn with_path_prefix(&self, prefix: &Path) -> Tools {
        Tools { dir: self.dir.clone(), path_prefix: Some(prefix.to_path_buf()) }
    }

    /// Runs `program args` and waits at most `timeout`; `what` names it in errors. A tool that does not finish in
    /// time is killed.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration, what: &str) -> PluginResult<Output> {
        let out = self.run_status(program, args, timeout, what)?;
        match out {
            (true, o) => Ok(o),
            (false, o) => Err(PluginError::failed(format!(
                "{what} failed: {}",
                tail(if o.stderr.trim().is_empty() { &o.stdout } else { &o.stderr }, 1500)
            ))),
        }
    }

    /// Like [`Tools::run`], but a tool that ran and failed is `(false, output)`.
    pub fn run_status(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
        what: &str,
    ) -> PluginResult<(bool, Output)> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = program.rsplit('/').next().unwrap_or(program);
        let out_path = self.dir.join(format!("{base}-{n}.out"));
        let err_path = self.dir.join(format!("{base}-{n}.err"));
        let create = |p: &Path| {
            std::fs::File::create(p)
                .map_err(|e| PluginError::failed(format!("{what}: cannot create {} ({e})", p.display())))
        };
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(create(&out_path)?).stderr(create(&err_path)?);
        cmd.env("LC_ALL", "C");
        if let Some(prefix) = &self.path_prefix {
            let old = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            cmd.env("PATH", format!("{}:{old}", prefix.display()));
        }
        let mut child = cmd.spawn().map_err(|e| {
            PluginError::failed(format!("{what}: cannot run {program} ({e}); is LXC installed (the lxc package)?"))
        })?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(PluginError::failed(format!(
                        "{what}: {program} did not finish within {} s and was killed",
                        timeout.as_secs()
                    )));
                }
                Err(e) => return Err(PluginError::failed(format!("{what}: cannot wait for {program} ({e})"))),
            }
        };
        let read = |p: &Path| {
            let s = std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let _ = std::fs::remove_file(p);
            s
        };
        let o = Output { stdout: read(&out_path), stderr: read(&err_path) };
        Ok((status.success(), o))
    }
}
