//! Holding the source's copy of the workload by means that outlive CRIU and phaul.
//!
//! Inside CRIU's post-dump notification the tree is dumped and ptrace-stopped by CRIU. Before anything is sent
//! to the destination phaul *engages* a hold: it moves the tree into a cgroup-v2 freezer of its own
//! ([`freezer`]) and, when the tree has TCP connections, adds an nftables table that keeps them silent
//! ([`netlock`]). From then on the tree cannot run, whatever happens to CRIU (a failed notification makes it
//! resume the tree, and so does phaul's death) — until phaul, its guard or `phaul resolve` either *resumes* it
//! (pty data CRIU drained written back ([`tty`]), the lock lifted, thawed) or *ends* it (TCP sockets put into
//! repair mode first ([`tcp`]) so that they vanish without a packet, then killed).

pub mod freezer;
pub mod netlock;
pub mod procs;
pub mod tcp;
pub mod tty;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use freezer::FreezerRecord;
pub use netlock::NetLockRecord;
pub use tcp::TcpConn;

use crate::journal::ProcId;

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("the tree's root (pid {pid}) no longer exists")]
    Gone { pid: i32 },
    #[error("cgroup v2 is not mounted on this host, and phaul holds a frozen source copy with cgroup v2's freezer; mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) and try again")]
    NoCgroup2,
    #[error("cannot use the freezer cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("{what} are still alive")]
    StillAlive { what: String },
    #[error("the workload has TCP connections, and phaul keeps them silent while it holds the frozen source copy with an nftables table, but `nft` is not installed; install it (Debian package nftables, which scripts/setup installs)")]
    NoNft,
    #[error("nft failed ({what}): {detail}")]
    Nft { what: String, detail: String },
    #[error("cannot switch TCP repair mode of the connection {conn}: {source}")]
    Repair { conn: String, source: std::io::Error },
    #[error(transparent)]
    Tty(#[from] tty::TtyWritebackError),
}

/// The name of a session's freezer cgroup and network lock table (`phaul-` and the session's first 16 hex
/// digits): fixed, so that a hold whose record never reached the journal can still be found and released.
pub fn hold_name(session: &str) -> String {
    format!("phaul-{}", &session[..16.min(session.len())])
}

/// Releases a hold known only by its name (its record never reached the journal): thaws the freezer cgroup
/// (its processes go to the cgroup2 root: where they came from is not known) and removes the lock table.
pub fn release_by_name(name: &str) -> Result<bool, HoldError> {
    let Some(mount) = freezer::cgroup2_mount() else { return Ok(false) };
    let path = mount.join(name);
    let mut found = false;
    if path.is_dir() {
        found = true;
        freezer::release_thaw(&FreezerRecord { path, members: Vec::new() })?;
    }
    if netlock::nft_binary().is_some() {
        let rec = NetLockRecord { table: format!("inet {name}"), own_netns: false, locks: String::new() };
        if netlock::remove(&rec, None).is_ok() {
            found = true;
        }
    }
    Ok(found)
}

/// What a hold consists of, kept in the source's journal so that another process can release it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    /// The tree's processes, root first.
    pub procs: Vec<ProcId>,
    pub freezer: FreezerRecord,
    pub netlock: Option<NetLockRecord>,
    pub tcp: Vec<TcpConn>,
}

/// How CRIU let go of a held tree whose workload stays on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriuAfter {
    /// CRIU resumed the tree itself (it lifted its own network lock and took the sockets out of repair mode).
    Resumed,
    /// CRIU died holding the tree: its sockets may still be in repair mode and its lock table still there.
    Died,
}

/// The operations the engine needs on the source's copy: a seam, so that unit tests record them instead.
pub trait Keeper: Send {
    /// Holds the tree rooted at `root` (ptrace-stopped by CRIU right now).
    fn engage(&mut self, name: &str, root: i32) -> Result<HoldRecord, HoldError>;
    /// The workload stays here: writes back the pty data CRIU drained (unless `tty_done`), lifts phaul's lock,
    /// thaws the tree. `final_round` is the dump's image directory.
    fn resume(
        &mut self,
        rec: &HoldRecord,
        after: CriuAfter,
        final_round: &Path,
        tty_done: bool,
    ) -> Result<(), HoldError>;
    /// The workload runs on the destination: the tree must go without a packet. `criu_killed`: CRIU ended it
    /// (after a successful post-dump answer); otherwise phaul kills it.
    fn end(&mut self, rec: &HoldRecord, criu_killed: bool) -> Result<(), HoldError>;
}

/// The real [`Keeper`].
#[derive(Debug, Default)]
pub struct SystemKeeper;

/// How long to wait for a tree to disappear once killed.
const DIE_TIMEOUT: Duration = Duration::from_secs(15);

impl Keeper for SystemKeeper {
    fn engage(&mut self, name: &str, root: i32) -> Result<HoldRecord, HoldError> {
        let procs = procs::tree_processes(root)?;
        let tcp = tcp::connections(&procs)?;
        let own_netns = netlock::has_own_netns(root);
        if (!tcp.is_empty() || own_netns) && netlock::nft_binary().is_none() {
            return Err(HoldError::NoNft);
        }
        let freezer = freezer::engage(name, &procs)?;
        let netlock = if !tcp.is_empty() || own_netns {
            match netlock::install(name, root, &tcp) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = freezer::release_thaw(&freezer);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(HoldRecord { procs, freezer, netlock, tcp })
    }

    fn resume(
        &mut self,
        rec: &HoldRecord,
        after: CriuAfter,
        final_round: &Path,
        tty_done: bool,
    ) -> Result<(), HoldError> {
        // Wait (bounded) for CRIU to have let go of every process: a thaw while CRIU still holds them is lost.
        let deadline = std::time::Instant::now() + DIE_TIMEOUT;
        while rec.procs.iter().any(|p| p.alive() && traced(p.pid)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if after == CriuAfter::Died {
            tcp::set_repair(&rec.tcp, false)?;
            match netlock::remove_criu_leftovers(&rec.tcp) {
                Ok(n) if n > 0 => log::info!("removed {n} network lock table(s) CRIU left behind"),
                Ok(_) => {}
                Err(e) => log::warn!("cannot remove CRIU's leftover network lock: {e}"),
            }
        }
        if !tty_done {
            let pids: Vec<i32> = rec.procs.iter().filter(|p| p.alive()).map(|p| p.pid).collect();
            let w = tty::write_back_tty_data(final_round, &pids)?;
            if !w.is_empty() {
                log::info!("wrote back {} bytes of pty data CRIU had drained at dump time", w.bytes_written());
            }
        }
        if let Some(l) = &rec.netlock {
            netlock::remove(l, rec.procs.first().filter(|p| p.alive()).map(|p| p.pid))?;
        }
        freezer::release_thaw(&rec.freezer)
    }

    fn end(&mut self, rec: &HoldRecord, criu_killed: bool) -> Result<(), HoldError> {
        if criu_killed {
            // CRIU killed the tree with its sockets in repair mode and keeps its own lock in place.
            if !procs::wait_all_gone(&rec.procs, DIE_TIMEOUT) {
                // Whatever survived CRIU's kill is killed through the cgroup.
                freezer::release_kill(&rec.freezer, DIE_TIMEOUT)?;
            }
            freezer::remove_when_empty(&rec.freezer, DIE_TIMEOUT)?;
            if let Some(l) = &rec.netlock {
                netlock::remove(l, None)?;
            }
            return Ok(());
        }
        // CRIU let go of the tree (or died): no socket may send a FIN or RST for a connection the destination
        // owns, so they go into repair mode before the kill; phaul's lock stays, as CRIU's own would.
        tcp::set_repair(&rec.tcp, true)?;
        freezer::release_kill(&rec.freezer, DIE_TIMEOUT)?;
        if !procs::wait_all_gone(&rec.procs, DIE_TIMEOUT) {
            return Err(HoldError::StillAlive { what: format!("processes of the tree rooted at {}", root_of(rec)) });
        }
        Ok(())
    }
}

/// Whether a process is being traced (by CRIU).
fn traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim() != "0")))
        .unwrap_or(false)
}

fn root_of(rec: &HoldRecord) -> i32 {
    rec.procs.first().map(|p| p.pid).unwrap_or(0)
}
