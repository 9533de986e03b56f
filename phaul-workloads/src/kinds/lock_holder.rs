//! `lock-holder`: holds an exclusive POSIX record lock (`fcntl(F_SETLK)`, whole file) on one file and a BSD
//! `flock(LOCK_EX)` on another, keeping both open and unchanged for its whole life.
//!
//! The self-check proves from inside that both locks are still this process's and still in force:
//! - `/proc/self/fdinfo/<fd>` of each held descriptor lists the lock (the kernel shows the locks owned by that
//!   descriptor's owner: the process for POSIX locks, the open file description for flock);
//! - a conflicting request is refused: `F_OFD_GETLK` on the held descriptor (an OFD lock's owner is the open
//!   file description, not the process, so the process's own POSIX lock conflicts with it) reports our write
//!   lock on the whole file held by our pid, and `flock(LOCK_EX|LOCK_NB)` on a fresh open of the flock file
//!   fails with `EWOULDBLOCK`.
//!
//! The POSIX-locked file is never opened a second time: closing any descriptor of a file drops every POSIX
//! lock the process holds on it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};
use serde_json::{Map, Value};

use crate::runner::Workload;

/// The two locked files, held open.
#[derive(Debug)]
pub struct LockHolder {
    path: PathBuf,
    flock_path: PathBuf,
    posix_file: File,
    flock_file: Flock<File>,
    /// Results of the latest check (None before the first).
    posix_held: Option<bool>,
    flock_held: Option<bool>,
    checks: u64,
}

/// The default flock file: `PATH.flock`.
pub fn default_flock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".flock");
    PathBuf::from(s)
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

fn open_rw(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Whether `/proc/self/fdinfo/<fd>` lists a write lock of `class` (`POSIX` or `FLOCK`) for that descriptor.
fn fdinfo_lists_write_lock(fd: i32, class: &str) -> Result<bool, String> {
    let p = format!("/proc/self/fdinfo/{fd}");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {p}: {e}"))?;
    Ok(fdinfo_has_write_lock(&text, class))
}

/// The `(class, mode)` of each `lock:` line of an fdinfo text, e.g. `("POSIX", "WRITE")` for
/// `lock:\t1: POSIX  ADVISORY  WRITE 1234 00:2b:56 0 EOF`. The kernel lists there the locks taken through
/// that very open file whose owner is the reading process (POSIX) or that open file (flock, OFD).
pub fn fdinfo_locks(fdinfo: &str) -> Vec<(&str, &str)> {
    fdinfo
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Some((*words.get(1)?, *words.get(3)?))
        })
        .collect()
}

/// Whether an fdinfo text has a `lock:` line of `class` in WRITE mode (see [`fdinfo_locks`]).
pub fn fdinfo_has_write_lock(fdinfo: &str, class: &str) -> bool {
    fdinfo_locks(fdinfo).iter().any(|&(c, m)| c == class && m == "WRITE")
}

impl LockHolder {
    /// Open (creating if needed) both files and take both locks without waiting.
    pub fn start(path: &Path, flock_path: &Path) -> Result<LockHolder, String> {
        if path == flock_path {
            return Err(format!("the POSIX-locked file and the flock file must differ (both {})", path.display()));
        }
        let posix_file = open_rw(path)?;
        let lock = whole_file(libc::F_WRLCK);
        match fcntl(posix_file.as_raw_fd(), FcntlArg::F_SETLK(&lock)) {
            Ok(_) => {}
            Err(e @ (Errno::EAGAIN | Errno::EACCES)) => {
                return Err(format!("{} is locked by another process (F_SETLK: {e})", path.display()))
            }
            Err(e) => return Err(format!("F_SETLK(F_WRLCK) on {} failed: {e}", path.display())),
        }
        let flock_file = Flock::lock(open_rw(flock_path)?, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == Errno::EWOULDBLOCK {
                format!("{} is flock()ed by another process", flock_path.display())
            } else {
                format!("flock(LOCK_EX) on {} failed: {e}", flock_path.display())
            }
        })?;
        Ok(LockHolder {
            path: path.to_path_buf(),
            flock_path: flock_path.to_path_buf(),
            posix_file,
            flock_file,
            posix_held: None,
            flock_held: None,
            checks: 0,
        })
    }

    fn check_posix(&self) -> Result<(), String> {
        let path = self.path.display();
        let fd = self.posix_file.as_raw_fd();
        if !fdinfo_lists_write_lock(fd, "POSIX")? {
            return Err(format!("the POSIX write lock on {path} is gone (not in /proc/self/fdinfo/{fd})"));
        }
        let mut probe = whole_file(libc::F_WRLCK);
        fcntl(fd, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| format!("F_OFD_GETLK on {path} failed: {e}"))?;
        let me = nix::unistd::getpid().as_raw();
        if i32::from(probe.l_type) == libc::F_UNLCK {
            return Err(format!("nothing holds a lock on {path} any more (F_OFD_GETLK: F_UNLCK)"));
        }
        if i32::from(probe.l_type) != libc::F_WRLCK || probe.l_pid != me || probe.l_start != 0 || probe.l_len != 0 {
            return Err(format!(
                "the lock on {path} is not our whole-file write lock: type {}, pid {} (we are {me}), start {}, len {}",
                probe.l_type, probe.l_pid, probe.l_start, probe.l_len
            ));
        }
        Ok(())
    }

    fn check_flock(&self) -> Result<(), String> {
        let path = self.flock_path.display();
        let fd = self.flock_file.as_raw_fd();
        if !fdinfo_lists_write_lock(fd, "FLOCK")? {
            return Err(format!("the flock on {path} is gone (not in /proc/self/fdinfo/{fd})"));
        }
        let other = File::open(&self.flock_path).map_err(|e| format!("cannot open {path} again: {e}"))?;
        match Flock::lock(other, FlockArg::LockExclusiveNonblock) {
            // Dropping the probe releases the lock it just took.
            Ok(probe) => {
                drop(probe);
                Err(format!("a second open of {path} could flock() it: the lock is not in force"))
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(()),
            Err((_, e)) => Err(format!("flock(LOCK_EX|LOCK_NB) probe on {path} failed: {e}")),
        }
    }
}

impl Workload for LockHolder {
    fn kind(&self) -> &'static str {
        "lock-holder"
    }

    fn check(&mut self) -> Result<(), String> {
        self.checks += 1;
        let posix = self.check_posix();
        let flock = self.check_flock();
        self.posix_held = Some(posix.is_ok());
        self.flock_held = Some(flock.is_ok());
        match (posix, flock) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("file".into(), Value::from(self.path.display().to_string()));
        m.insert("flock_file".into(), Value::from(self.flock_path.display().to_string()));
        m.insert("posix_lock_held".into(), self.posix_held.map_or(Value::Null, Value::from));
        m.insert("flock_held".into(), self.flock_held.map_or(Value::Null, Value::from));
        m.insert("checks".into(), Value::from(self.checks));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_parsing() {
        let text = "pos:\t0\nflags:\t02100002\nmnt_id:\t30\nino:\t1234\n\
                    lock:\t1: POSIX  ADVISORY  WRITE 4321 00:2b:1234 0 EOF\n";
        assert!(fdinfo_has_write_lock(text, "POSIX"));
        assert!(!fdinfo_has_write_lock(text, "FLOCK"));
        assert!(fdinfo_has_write_lock("lock:\t1: FLOCK  ADVISORY  WRITE 1 00:2b:1 0 EOF\n", "FLOCK"));
        assert!(!fdinfo_has_write_lock("lock:\t1: FLOCK  ADVISORY  READ 1 00:2b:1 0 EOF\n", "FLOCK"));
        assert!(!fdinfo_has_write_lock("pos:\t0\n", "POSIX"));
        let two = "lock:\t1: POSIX  ADVISORY  READ 9 fe:00:1 128 128\nlock:\t2: POSIX  ADVISORY  WRITE 9 fe:00:1 0 3\n";
        assert_eq!(fdinfo_locks(two), vec![("POSIX", "READ"), ("POSIX", "WRITE")]);
        assert!(fdinfo_locks("lock:\t1:\n").is_empty());
    }

    #[test]
    fn default_flock_path_appends_suffix() {
        assert_eq!(default_flock_path(Path::new("/tmp/a.lock")), PathBuf::from("/tmp/a.lock.flock"));
    }

    #[test]
    fn holds_both_locks_and_checks_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let fpath = default_flock_path(&path);
        let mut h = LockHolder::start(&path, &fpath).expect("start");
        h.check().expect("first check");
        h.check().expect("the check took and left no lock of its own");
        assert_eq!(h.fields()["posix_lock_held"], true);
        assert_eq!(h.fields()["flock_held"], true);
        // A second holder in this process: the flock is refused (per open file description).
        assert!(LockHolder::start(&dir.path().join("other"), &fpath).is_err());
        assert!(LockHolder::start(&path, &path).is_err());
    }

    #[test]
    fn a_lost_flock_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let fpath = dir.path().join("f");
        let mut h = LockHolder::start(&path, &fpath).expect("start");
        // Downgrade the held flock to a shared one: no longer the exclusive lock the check wants.
        h.flock_file.relock(FlockArg::LockSharedNonblock).expect("downgrade");
        let e = h.check().expect_err("a shared lock is not the exclusive one");
        assert!(e.contains(&fpath.display().to_string()), "{e}");
        assert_eq!(h.fields()["flock_held"], false);
        assert_eq!(h.fields()["posix_lock_held"], true);
        h.flock_file.relock(FlockArg::LockExclusiveNonblock).expect("upgrade back");
        h.check().expect("held again");
    }

    #[test]
    fn a_lost_posix_lock_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let mut h = LockHolder::start(&path, &dir.path().join("f")).expect("start");
        // The POSIX pitfall itself: closing any descriptor of the file drops the process's locks on it.
        drop(File::open(&path).expect("open again"));
        let e = h.check().expect_err("the lock went with the close");
        assert!(e.contains("POSIX"), "{e}");
        assert_eq!(h.fields()["posix_lock_held"], false);
    }
}
