//! Process helpers: liveness (zombies count as dead), bounded reaping, namespaces of a pid.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::TestbedError;

const POLL: Duration = Duration::from_millis(10);

/// Fail with a clear message unless running as root.
pub fn require_root() -> Result<(), TestbedError> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(TestbedError::NotRoot { euid: euid.as_raw() })
    }
}

/// The fields of `/proc/PID/stat` the testbed uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter (`R`, `S`, `D`, `Z`, `X`, ...).
    pub state: char,
    /// The parent's pid.
    pub ppid: i32,
    /// Start time in clock ticks after boot (identifies the process together with its pid).
    pub start_time: u64,
}

/// Parse the text of `/proc/PID/stat`. The command name may contain spaces and parentheses, so the
/// fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3 of the line, ppid 4, starttime 22; here they are 0, 1 and 19.
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, ppid, start_time })
}

/// Read `/proc/PID/stat`.
pub fn proc_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable /proc/{pid}/stat")))
}

/// Whether `pid` exists and is not a zombie (or dead and about to vanish).
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && matches!(proc_stat(pid), Ok(st) if st.state != 'Z' && st.state != 'X')
}

/// Wait at most `timeout` for `pid` to be gone (or a zombie); true if it is.
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The inode of `pid`'s network namespace (`/proc/PID/ns/net`).
pub fn netns_of_pid(pid: i32) -> io::Result<u64> {
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// The `NSpid` line of `/proc/PID/status`: the pid in each nested pid namespace, outermost first (so the
/// last entry is the pid as the process sees itself).
pub fn ns_pids(pid: i32) -> io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no NSpid in /proc/{pid}/status")))?;
    line.split_whitespace()
        .map(|f| f.parse::<i32>().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)))
        .collect()
}

/// Every live pid whose network namespace has inode `netns_inode` (e.g. to find a restored workload in
/// host B: `pids_in_netns(pair.b().netns_inode()?)`). Processes vanishing during the scan are skipped.
pub fn pids_in_netns(netns_inode: u64) -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if netns_of_pid(pid).is_ok_and(|ino| ino == netns_inode) && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Make this process a child subreaper, so that trees orphaned under it (e.g. restored by CRIU, whose
/// parent exits) are reparented to it rather than to init. Reap them with [`reap_pid`].
pub fn become_subreaper() -> Result<(), TestbedError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| TestbedError::sys("prctl(PR_SET_CHILD_SUBREAPER)", e))
}

/// Reap our child `pid` (never any other), waiting at most `timeout`. `Ok(None)` if it is still running
/// then; an error if it is not our child (`ECHILD`).
pub fn reap_pid(pid: i32, timeout: Duration) -> Result<Option<WaitStatus>, TestbedError> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return Ok(Some(status)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(TestbedError::sys(format!("waitpid({pid})"), e)),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let line = "1234 (a) b (c)) S 99 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st, ProcStat { state: 'S', ppid: 99, start_time: 987654 });
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process() {
        let me = std::process::id() as i32;
        assert!(pid_alive(me));
        assert!(proc_stat(me).is_ok_and(|s| s.start_time > 0));
        assert!(!ns_pids(me).expect("NSpid").is_empty());
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
    }
}
