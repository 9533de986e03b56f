//! Holding a tree frozen with a cgroup-v2 freezer that phaul owns: it outlives CRIU and phaul. Moved in while
//! CRIU still has the tree ptrace-stopped (inside its post-dump notification), the processes stay frozen after
//! CRIU lets go of them, whether CRIU resumed them after a failed notification or died; they run again only when
//! phaul (or its guard, or `phaul resolve`) thaws them, and die when it kills them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::HoldError;
use crate::journal::ProcId;

/// A held tree: the freezer cgroup and where each process was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezerRecord {
    /// The freezer cgroup's directory.
    pub path: PathBuf,
    /// Each process and its cgroup-v2 path before (relative to the cgroup2 mount, starting with `/`).
    pub members: Vec<(ProcId, String)>,
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from)).flatten()
    })
}

/// A process's cgroup-v2 path (the `0::` line of /proc/PID/cgroup).
fn cgroup2_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
}

fn write(path: &Path, value: &str) -> Result<(), HoldError> {
    std::fs::write(path, value).map_err(|source| HoldError::Cgroup { path: path.to_path_buf(), source })
}

fn procs_of(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn join(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

/// Moves `procs` into a new freezer cgroup named `name` and freezes it. On failure every process moved so far is
/// moved back and the cgroup removed.
pub fn engage(name: &str, procs: &[ProcId]) -> Result<FreezerRecord, HoldError> {
    let mount = cgroup2_mount().ok_or(HoldError::NoCgroup2)?;
    let path = mount.join(name);
    std::fs::create_dir(&path).map_err(|source| HoldError::Cgroup { path: path.clone(), source })?;
    let mut rec = FreezerRecord { path: path.clone(), members: Vec::new() };
    let r = (|| {
        for p in procs {
            let Some(orig) = cgroup2_of(p.pid) else { continue };
            write(&path.join("cgroup.procs"), &p.pid.to_string())?;
            rec.members.push((*p, orig));
        }
        write(&path.join("cgroup.freeze"), "1")
    })();
    match r {
        Ok(()) => Ok(rec),
        Err(e) => {
            let _ = release_thaw(&rec);
            Err(e)
        }
    }
}

/// Whether the cgroup reports itself frozen.
pub fn is_frozen(rec: &FreezerRecord) -> bool {
    std::fs::read_to_string(rec.path.join("cgroup.events")).map(|t| t.lines().any(|l| l == "frozen 1")).unwrap_or(false)
}

fn remove_dir(path: &Path, timeout: Duration) -> Result<(), HoldError> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(HoldError::Cgroup { path: path.to_path_buf(), source: e });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Thaws the tree and moves each surviving process back where it was, then removes the cgroup.
pub fn release_thaw(rec: &FreezerRecord) -> Result<(), HoldError> {
    if !rec.path.is_dir() {
        return Ok(());
    }
    write(&rec.path.join("cgroup.freeze"), "0")?;
    let mount = rec.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut first_err = None;
    for (p, orig) in &rec.members {
        if !p.alive() {
            continue;
        }
        if let Err(e) = write(&join(&mount, orig).join("cgroup.procs"), &p.pid.to_string()) {
            // The original cgroup went away: the parent of the freezer is the best place left.
            log::warn!("{e}; moving pid {} to {} instead", p.pid, mount.display());
            if let Err(e2) = write(&mount.join("cgroup.procs"), &p.pid.to_string()) {
                first_err.get_or_insert(e2);
            }
        }
    }
    // Anything the tree forked meanwhile goes to the root process's original cgroup.
    for pid in procs_of(&rec.path) {
        let to = rec.members.first().map(|(_, o)| join(&mount, o)).unwrap_or_else(|| mount.clone());
        let _ = write(&to.join("cgroup.procs"), &pid.to_string());
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    remove_dir(&rec.path, Duration::from_secs(5))
}

/// Kills everything in the cgroup (frozen or not), waits until it is empty, removes it.
pub fn release_kill(rec: &FreezerRecord, timeout: Duration) -> Result<(), HoldError> {
    if !rec.path.is_dir() {
        return Ok(());
    }
    if write(&rec.path.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill; a fatal signal ends frozen processes too.
        for pid in procs_of(&rec.path) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    remove_when_empty(rec, timeout)
}

/// Waits until the cgroup is empty (CRIU killed the tree itself) and removes it.
pub fn remove_when_empty(rec: &FreezerRecord, timeout: Duration) -> Result<(), HoldError> {
    let deadline = Instant::now() + timeout;
    while !procs_of(&rec.path).is_empty() {
        if Instant::now() >= deadline {
            return Err(HoldError::StillAlive { what: format!("processes in {}", rec.path.display()) });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    remove_dir(&rec.path, timeout.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A shell loop that counts into a file every 10 ms; killed (with its tree) when dropped, so that a failed
    /// assertion leaves nothing running.
    struct Counter(std::process::Child);

    impl Counter {
        fn id(&self) -> u32 {
            self.0.id()
        }
        fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
            self.0.wait()
        }
    }

    impl Drop for Counter {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let procs = super::super::procs::tree_processes(self.0.id() as i32).unwrap_or_default();
                for p in &procs {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
                }
                // (cgroup v2 lets SIGKILL end a frozen task.)
                let _ = self.0.wait();
            }
        }
    }

    fn counter(file: &Path) -> Counter {
        Counter(
            Command::new("sh")
                .args(["-c", &format!("i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.01; done", file.display())])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        )
    }

    fn read(file: &Path) -> u64 {
        std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Waits (10 s at most: a loaded machine schedules the loop late) until the counter passes `n`.
    fn counts_past(file: &Path, n: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if read(file) > n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn freezes_thaws_and_kills_a_real_tree() {
        if cgroup2_mount().is_none() {
            eprintln!("no cgroup2 here; skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("count");
        let mut child = counter(&file);
        assert!(counts_past(&file, 0), "the counter never started");
        let procs = super::super::procs::tree_processes(child.id() as i32).expect("tree");
        let name = format!("phaul-test-{}", std::process::id());
        let rec = engage(&name, &procs).expect("engage");
        std::thread::sleep(Duration::from_millis(100));
        assert!(is_frozen(&rec));
        let a = read(&file);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(read(&file), a, "the tree ran while frozen");
        release_thaw(&rec).expect("thaw");
        assert!(!rec.path.exists());
        assert!(counts_past(&file, a), "the tree did not run again within 10 s");
        let procs = super::super::procs::tree_processes(child.id() as i32).expect("tree");
        let rec = engage(&name, &procs).expect("engage again");
        release_kill(&rec, Duration::from_secs(5)).expect("kill");
        let _ = child.wait();
        assert!(!rec.path.exists());
    }
}
