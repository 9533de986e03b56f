//! The restore, on a thread of its own: CRIU's RESTORE request is held inside its post-restore notification until
//! the session decides (commit: the tree runs; anything else: CRIU kills it), while the session goes on serving
//! the control channel and reconnections.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phaul_abi::HostTypeBox;
use phaul_proto::criu::{CriuOpts, CriuReqType};

use super::{lock, Event};
use crate::criu::{rpc, CriuBackend};
use crate::engine::fault;
use crate::hold::procs;

pub(super) struct Job {
    pub criu: Arc<dyn CriuBackend>,
    pub dir: PathBuf,
    pub opts: CriuOpts,
    /// Descriptors CRIU inherits (the host type's `inherit_fds`).
    pub fds: crate::criu::PassedFds,
    pub open_dir: rpc::OpenDir,
    pub htype: Arc<Mutex<HostTypeBox>>,
    pub htype_name: String,
    pub events: Sender<Event>,
    /// `true`: let the held tree run; `false` (or the sender gone): discard it.
    pub decisions: Receiver<bool>,
}

pub(super) fn spawn(job: Job) {
    std::thread::spawn(move || run(job));
}

fn run(job: Job) {
    let Job { criu, dir, opts, fds, open_dir, htype, htype_name, events, decisions } = job;
    let mut s = match criu.session(fds, Some(&dir.join("criu-stderr.log"))) {
        Ok(s) => s,
        Err(e) => {
            let _ = events.send(Event::RestoreDone(Err(e)));
            return;
        }
    };
    s.set_log(dir.join("restore.log"));
    let criu_pid = s.pid();
    fault::criu_started(criu_pid);
    let _ = events.send(Event::RestoreCriu(criu_pid));
    let started = Instant::now();
    let result = {
        let mut handler = |script: &str, pid: Option<i32>| -> Result<(), String> {
            fault::at("dst", "notify", script);
            // The host type hears of every notification first; then phaul acts on it and answers CRIU.
            crate::plugins::notify(&mut lock(&htype), script, pid, rpc::notification_fd())
                .into_result()
                .map_err(|e| format!("the destination's host type '{htype_name}' failed in {script}: {e}"))?;
            on_restore_action(script, pid, &events, &decisions, started)
        };
        s.call("RESTORE", rpc::req(CriuReqType::Restore, Some(opts)), &mut handler)
    };
    drop(s);
    drop(open_dir);
    fault::criu_gone(criu_pid);
    let _ = events.send(Event::RestoreDone(result.map(|_| ())));
}

/// What the session does on one of CRIU's restore actions, whether CRIU's RPC or the action script of a host type
/// that restores by itself reported it. `Ok` lets CRIU go on; an error makes it fail the restore and kill the tree.
pub(super) fn on_restore_action(
    script: &str,
    pid: Option<i32>,
    events: &Sender<Event>,
    decisions: &Receiver<bool>,
    started: Instant,
) -> Result<(), String> {
    match script {
        "setup-namespaces" => {
            let pid = pid.ok_or("CRIU's setup-namespaces notification named no pid")?;
            // From here on the restored root exists: should CRIU die, the session kills it by this pid (CRIU's
            // half-restored child would otherwise outlive it, holding CRIU's socket open).
            let _ = events.send(Event::RestoreRoot(pid));
            Ok(())
        }
        "pre-resume" | "post-resume" => {
            // CRIU is letting the tree go: from here on it runs even if CRIU dies.
            let _ = events.send(Event::Released);
            Ok(())
        }
        "post-restore" => {
            // The hold: the tree exists and has not run. It runs only if the session says so.
            let _ = events.send(Event::Held { pid, wall: started.elapsed() });
            match decisions.recv() {
                Ok(true) => Ok(()),
                _ => Err("the migration was not committed; the restored copy is discarded".to_string()),
            }
        }
        _ => Ok(()),
    }
}

/// Kills a restored tree by its root (the init of its pid namespace, so the kernel ends the rest) and waits,
/// bounded, until every process of it is gone.
pub fn kill_restored_tree(pid: i32) {
    if pid <= 1 {
        return;
    }
    let procs = procs::tree_processes(pid).unwrap_or_default();
    for p in &procs {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
    }
    if !procs::wait_all_gone(&procs, Duration::from_secs(10)) {
        log::error!("the restored tree {pid} is still alive 10 s after SIGKILL");
    }
}

/// Ends a restoring CRIU and everything it has restored so far (its children).
pub(super) fn kill_criu_tree(criu_pid: u32) {
    let procs = procs::tree_processes(criu_pid as i32).unwrap_or_default();
    // Children first: a restored root is CRIU's child.
    for p in procs.iter().rev() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
    }
    if !procs::wait_all_gone(&procs, Duration::from_secs(10)) {
        log::error!("the restoring CRIU {criu_pid} or what it restored is still alive 10 s after SIGKILL");
    }
}
