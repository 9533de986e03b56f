//! The processes of a tree, from /proc.

use std::collections::BTreeSet;

use super::HoldError;
use crate::journal::ProcId;

/// Every process of the tree rooted at `root` (following /proc/PID/task/TID/children of every thread), root
/// first, each with its start time.
pub fn tree_processes(root: i32) -> Result<Vec<ProcId>, HoldError> {
    let first = ProcId::of(root).ok_or(HoldError::Gone { pid: root })?;
    let mut out = vec![first];
    let mut seen = BTreeSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        let pid = out[i].pid;
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(t.path().join("children")) else { continue };
            for c in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if seen.insert(c) {
                    if let Some(p) = ProcId::of(c) {
                        out.push(p);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// About what the image set of the tree rooted at `root` will take: the anonymous memory its processes hold,
/// resident or swapped (`RssAnon` + `VmSwap`; file-backed pages are not dumped). Pages processes share after a
/// fork are counted once per process, so this errs high. 0 when it cannot be read.
pub fn tree_resident_bytes(root: i32) -> u64 {
    let Ok(procs) = tree_processes(root) else { return 0 };
    let field = |s: &str, name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    procs
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok())
        .map(|s| field(&s, "RssAnon:") + field(&s, "VmSwap:"))
        .sum::<u64>()
        * 1024
}

/// Whether none of `procs` is alive any more.
pub fn all_gone(procs: &[ProcId]) -> bool {
    procs.iter().all(|p| !p.alive())
}

/// Waits, bounded, until none of `procs` is alive.
pub fn wait_all_gone(procs: &[ProcId], timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if all_gone(procs) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_children() {
        let mut child =
            std::process::Command::new("sh").args(["-c", "sleep 30 & sleep 30 & wait"]).spawn().expect("spawn");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut n = 0;
        while std::time::Instant::now() < deadline {
            n = tree_processes(pid).expect("tree").len();
            if n == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let procs = tree_processes(pid).expect("tree");
        for p in procs.iter().rev() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.wait();
        assert_eq!(n, 3, "sh and its two sleeps");
        assert_eq!(procs[0].pid, pid);
    }
}
