//! The source's guard: a second phaul process, started when the workload is frozen, that outlives `phaul
//! migrate`. It waits on a pipe; when `phaul migrate` settles the session it says `done` (or `in-doubt`: the
//! session is left to `phaul resolve`), and the guard exits. If `phaul migrate` dies first, the pipe ends without
//! either word and the guard settles the source's copy as the journal says: resumed if nothing was committed,
//! ended if the destination confirmed, and otherwise it asks the destination again for a bounded time.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use command_fds::{CommandFdExt, FdMapping};

use super::source::{Guard, GuardSpawner};

/// The descriptor number the watch pipe gets in the guard.
pub const WATCH_FD: i32 = 3;

/// Starts guards by running a program (phaul itself) as `PROGRAM ARGS... --journal PATH --watch-fd 3`, its
/// output to a log file beside the journal, in a process group of its own (a signal meant for `phaul migrate`'s
/// terminal does not reach it).
#[derive(Debug, Clone)]
pub struct ProcessGuards {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl GuardSpawner for ProcessGuards {
    fn spawn(&self, journal: &Path) -> std::io::Result<Guard> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let log = journal.with_extension("guard.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg("--journal")
            .arg(journal)
            .arg("--watch-fd")
            .arg(WATCH_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        cmd.fd_mappings(vec![FdMapping { parent_fd: read, child_fd: WATCH_FD }])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let child = cmd.spawn()?;
        let pid = child.id();
        // Reaped by whoever is this process's reaper; the guard is meant to outlive it anyway.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let mut w = std::fs::File::from(write);
        Ok(Guard {
            pid,
            tell: Box::new(move |word| {
                let _ = writeln!(w, "{word}");
                let _ = w.flush();
            }),
        })
    }
}
