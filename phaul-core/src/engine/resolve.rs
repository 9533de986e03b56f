//! Settling a session after a process died or a link was cut, from the journals: `phaul resolve` on either host,
//! the source's guard, and the destination's answers to `Resolve`.
//!
//! The rules: the destination's copy runs only after `Commit`; the source's copy is resumed (or restored from its
//! image set) only once it is known that the destination holds no copy; it is ended only once it is known that the
//! destination's copy runs. When neither can be learnt, nothing is done and the answer says so.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phaul_abi::CriuOptions;
use phaul_proto::criu::CriuReqType;
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, Decision, SessionState};

use super::destination::{kill_restored_tree, DestinationContext};
use crate::criu::{build_opts, rpc, CriuBackend};
use crate::hold::{CriuAfter, Keeper};
use crate::journal::{
    DestinationJournal, DestinationState, JournalError, Journals, ProcId, SourceJournal, SourceState,
};
use crate::transport::{self, Channel, ChannelName};
use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot ask the destination: {0}")]
    Ask(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Hold(#[from] crate::hold::HoldError),
    #[error("{0}")]
    Failed(String),
    #[error("the outcome of session {session} is still in doubt: {detail}. {copies} Run `phaul resolve {session}` again once the destination can be reached{how}; or, if you know the destination holds no copy, `phaul resolve {session} --force resume`; if you know it runs the workload, `--force end`")]
    StillInDoubt { session: String, detail: String, copies: String, how: String },
    #[error("another process (pid {pid}) is settling session {session} right now; wait for it to finish")]
    Busy { session: String, pid: u32 },
}

/// Asks the destination at `addr` about a session on a new connection.
pub fn ask(
    dialer: &transport::Dialer,
    addr: &str,
    session: &str,
    decision: Decision,
    timeout: Duration,
) -> Result<w::ResolveReply, ResolveError> {
    let ch = dialer
        .dial(addr, ChannelName::Rpc, timeout.min(Duration::from_secs(5)), 5)
        .map_err(|e| ResolveError::Ask(e.to_string()))?;
    ask_on(ch, session, decision, timeout)
}

/// Asks on a connection the caller made (handed-in descriptors).
pub fn ask_on(
    mut ch: Channel,
    session: &str,
    decision: Decision,
    timeout: Duration,
) -> Result<w::ResolveReply, ResolveError> {
    let _ = ch.set_read_timeout(timeout);
    wire::send(&mut ch, Body::Resolve(w::Resolve { session: session.into(), decision: decision as i32 }))?;
    match wire::recv(&mut ch)? {
        Body::ResolveReply(r) => Ok(r),
        Body::Failure(f) => Err(ResolveError::Ask(f.message)),
        other => Err(ResolveError::Ask(format!("the destination answered with {}", wire::body_name(&other)))),
    }
}

/// Brings a destination journal up to date with the processes as they are: a held copy whose CRIU is gone was
/// killed with it (or is stuck in CRIU's restorer, and is killed now); a commit received whose copy runs is
/// committed.
pub fn settle_destination(journals: &Journals, j: &mut DestinationJournal) -> Result<(), JournalError> {
    if !matches!(j.state, DestinationState::Held | DestinationState::CommitReceived | DestinationState::Active) {
        return Ok(());
    }
    // Give a CRIU that is still finishing a moment.
    if let Some(c) = j.criu_pid {
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::sys::pid_alive(c as i32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if crate::sys::pid_alive(c as i32) {
            // Another phaul may still be serving this session; leave it alone.
            return Ok(());
        }
    }
    let alive = j.restored.is_some_and(|p| p.alive());
    let (state, note) = match (j.state, alive) {
        (DestinationState::CommitReceived, true) => (DestinationState::Committed, "the copy runs here (settled)"),
        (DestinationState::CommitReceived, false) if j.restart => {
            // The host type's start was under way and named no pid: the workload may run here or not. Only the
            // operator can tell (`phaul resolve --force`); calling it aborted could leave two copies running.
            if j.note.starts_with("in doubt") {
                return Ok(());
            }
            (
                DestinationState::CommitReceived,
                "in doubt: this serve ended while its host type was starting the workload (restart mode); see whether it runs here",
            )
        }
        (DestinationState::Held, true) => {
            // CRIU is gone without letting the tree run (`commit-received` is recorded before CRIU is told to
            // let it run): it sits in CRIU's restorer and must go.
            if let Some(p) = j.restored {
                kill_restored_tree(p.pid);
            }
            (DestinationState::Aborted, "the held copy outlived its CRIU and was killed (settled)")
        }
        (DestinationState::Active, true) => {
            // A restore under way when this serve died: the half-restored tree never ran.
            if let Some(p) = j.restored {
                kill_restored_tree(p.pid);
            }
            (DestinationState::Aborted, "the session ended during its restore; what was restored was killed (settled)")
        }
        (DestinationState::Active, false) => {
            (DestinationState::Aborted, "the session ended before anything was restored (settled)")
        }
        (_, false) => (DestinationState::Aborted, "no restored copy exists (settled)"),
        _ => return Ok(()),
    };
    j.state = state;
    j.note = note.into();
    journals.write(j)
}

fn state_of(j: &DestinationJournal) -> SessionState {
    match j.state {
        DestinationState::Committed => SessionState::StateCommitted,
        DestinationState::Lost => SessionState::StateLost,
        DestinationState::Held => SessionState::StateHeld,
        DestinationState::Active | DestinationState::CommitReceived => SessionState::StateActive,
        DestinationState::Aborted => SessionState::StateAborted,
    }
}

/// Answers a `Resolve` about a session this destination is not serving right now, from its journal; only to the
/// peer that opened the session (when it came over TLS).
pub(crate) fn answer_from_journal(
    journals: &Journals,
    _ctx: &DestinationContext<'_>,
    mut ch: Channel,
    r: w::Resolve,
    peer: &Option<String>,
) {
    let reply = match journals.read::<DestinationJournal>(&r.session) {
        Ok(Some(j)) if j.peer.is_some() && &j.peer != peer => {
            log::warn!("a peer other than the one that opened session {} asked about it; refused", r.session);
            let _ = wire::send_failure(&mut ch, "this session was opened by another peer".into(), Vec::new());
            return;
        }
        Ok(Some(mut j)) => {
            if let Err(e) = settle_destination(journals, &mut j) {
                log::warn!("{e}");
            }
            w::ResolveReply {
                state: state_of(&j) as i32,
                pid: j.restored.map(|p| p.pid).unwrap_or(0),
                detail: j.note.clone(),
            }
        }
        Ok(None) => w::ResolveReply {
            state: SessionState::StateUnknown as i32,
            pid: 0,
            detail: "this destination has no record of the session".into(),
        },
        Err(e) => {
            let _ = wire::send_failure(&mut ch, e.to_string(), Vec::new());
            return;
        }
    };
    let _ = wire::send(&mut ch, Body::ResolveReply(reply));
}

/// Restores a tree from a complete image set in `dir` on this host, returning its root pid.
pub fn restore_from_images(criu: &dyn CriuBackend, dir: &Path, h: &CriuOptions) -> Result<i32, String> {
    let (base, _open) = rpc::dir_opts(dir, "restore-on-source.log").map_err(|e| e.to_string())?;
    let (mut opts, fds) = build_opts(base, h).map_err(|e| e.to_string())?;
    opts.notify_scripts = Some(true);
    let mut s = criu.session(fds, Some(&dir.join("criu-stderr-restore.log"))).map_err(|e| e.to_string())?;
    s.set_log(dir.join("restore-on-source.log"));
    let resp =
        s.call("RESTORE", rpc::req(CriuReqType::Restore, Some(opts)), &mut |_, _| Ok(())).map_err(|e| e.to_string())?;
    resp.restore.map(|r| r.pid).filter(|p| *p > 0).ok_or_else(|| "CRIU restored the tree but named no pid".to_string())
}

/// How `phaul resolve` may reach the destination.
pub enum Reach {
    /// The journal's `--to` address (or another), with how to connect.
    Addr(String, transport::Dialer),
    /// A connection handed in.
    Channel(Channel),
    /// Not at all.
    None,
}

/// What the operator decides when the destination cannot tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    /// The destination holds no copy: resume the source's.
    Resume,
    /// The destination runs the workload: end the source's copy.
    End,
}

/// What settling the source's side did.
#[derive(Debug, Clone)]
pub struct Settled {
    pub state: SourceState,
    pub message: String,
}

/// An exclusive claim on settling one session (a lock file beside the journal).
pub struct Claim {
    _f: nix::fcntl::Flock<std::fs::File>,
}

/// Claims a session for settling, or says who has it.
pub fn claim(journals: &Journals, session: &str) -> Result<Claim, ResolveError> {
    let path = journals.dir().join(format!("{session}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| ResolveError::Failed(format!("cannot open {}: {e}", path.display())))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(f) => {
            let _ = std::fs::write(&path, format!("{}\n", std::process::id()));
            Ok(Claim { _f: f })
        }
        Err(_) => {
            let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            Err(ResolveError::Busy { session: session.into(), pid })
        }
    }
}

/// The engine parts settling needs on the source.
pub struct SourceSettler<'a> {
    pub criu: &'a dyn CriuBackend,
    pub keeper: &'a mut dyn Keeper,
    /// Restore options of the session's host type (for an image-set copy).
    pub restore_options: &'a dyn Fn(&SourceJournal) -> Result<CriuOptions, String>,
    /// Restart mode: starts the session's workload here again through its host type, returning its root pid.
    pub start_again: &'a dyn Fn(&SourceJournal) -> Result<i32, String>,
    pub journals: &'a Journals,
    /// How to reach the journal's `--to` address, when the caller gave none.
    pub dialer: Option<transport::Dialer>,
}

impl SourceSettler<'_> {
    fn write(&self, j: &mut SourceJournal, state: SourceState, note: &str) -> Result<(), ResolveError> {
        j.state = state;
        j.note = note.into();
        self.journals.write(j)?;
        Ok(())
    }

    /// The workload stays here: resume the held tree, or restore it from the image set.
    fn resume(&mut self, j: &mut SourceJournal, why: &str) -> Result<Settled, ResolveError> {
        if j.handover == "restart" {
            if j.root.is_some_and(|r| r.alive()) {
                let msg = format!("{why}: the workload runs on this host");
                self.write(j, SourceState::RolledBack, &msg)?;
                return Ok(Settled { state: SourceState::RolledBack, message: msg });
            }
            let pid = (self.start_again)(j).map_err(|e| {
                ResolveError::Failed(format!(
                    "starting the workload again through its '{}' host type failed: {e}; it is stopped here, its files intact",
                    j.htype
                ))
            })?;
            j.root = ProcId::of(pid);
            let msg = format!("{why}: the workload was started again on this host (pid {pid})");
            self.write(j, SourceState::RolledBack, &msg)?;
            return Ok(Settled { state: SourceState::RolledBack, message: msg });
        }
        if let Some(h) = j.hold.clone() {
            let dir = j.final_round.clone().unwrap_or_else(|| j.image_dir.clone());
            // CRIU is gone by now; whether it resumed the tree or died, the safe way back is the same.
            self.keeper.resume(&h, CriuAfter::Died, &dir, j.tty_written_back)?;
            j.tty_written_back = true;
            let msg = format!("{why}: the workload was resumed on this host");
            self.write(j, SourceState::RolledBack, &msg)?;
            return Ok(Settled { state: SourceState::RolledBack, message: msg });
        }
        if j.state == SourceState::ImagesOnly || j.handover == "sequential" {
            let dir =
                j.final_round.clone().ok_or_else(|| ResolveError::Failed("the journal names no image set".into()))?;
            if j.root.is_some_and(|r| r.alive()) {
                let msg = format!("{why}: the workload already runs on this host");
                self.write(j, SourceState::RolledBack, &msg)?;
                return Ok(Settled { state: SourceState::RolledBack, message: msg });
            }
            let h = (self.restore_options)(j).map_err(ResolveError::Failed)?;
            let pid = restore_from_images(self.criu, &dir, &h).map_err(|e| {
                ResolveError::Failed(format!("restoring from {} failed: {e}; the images are kept", dir.display()))
            })?;
            j.root = ProcId::of(pid);
            let msg = format!("{why}: the workload was restored on this host from {} (pid {pid})", dir.display());
            self.write(j, SourceState::RolledBack, &msg)?;
            return Ok(Settled { state: SourceState::RolledBack, message: msg });
        }
        // Frozen, but the hold's record never reached the journal: it is found by its name.
        let msg = if crate::hold::release_by_name(&crate::hold::hold_name(&j.session))? {
            format!("{why}: the workload was resumed on this host")
        } else {
            format!("{why}: nothing was frozen; the workload runs on this host")
        };
        self.write(j, SourceState::RolledBack, &msg)?;
        Ok(Settled { state: SourceState::RolledBack, message: msg })
    }

    /// The workload runs on the destination: the source's copy goes.
    fn end(&mut self, j: &mut SourceJournal, why: &str, lost: bool) -> Result<Settled, ResolveError> {
        if let Some(h) = j.hold.clone() {
            self.keeper.end(&h, false)?;
        }
        let state = if lost { SourceState::Lost } else { SourceState::Migrated };
        let msg = if lost {
            format!("{why}: the workload is lost; the source's copy was ended")
        } else {
            format!("{why}: the workload runs on the destination; the source's copy was ended")
        };
        self.write(j, state, &msg)?;
        Ok(Settled { state, message: msg })
    }

    /// Settles the source's side of `session`: from the journal, asking the destination when the journal alone
    /// cannot tell, for at most `patience`.
    pub fn settle(
        &mut self,
        session: &str,
        mut reach: Reach,
        force: Option<Force>,
        patience: Duration,
    ) -> Result<Settled, ResolveError> {
        let mut j: SourceJournal = self.journals.read(session)?.ok_or_else(|| JournalError::NotFound {
            session: session.into(),
            dir: self.journals.dir().to_path_buf(),
        })?;
        if j.state.is_final() {
            return Ok(Settled { state: j.state, message: format!("already settled: {}", j.note) });
        }
        match j.state {
            SourceState::Running | SourceState::Frozen | SourceState::ImagesOnly | SourceState::Stopped => {
                return self.resume(&mut j, "nothing was committed");
            }
            SourceState::Committed => return self.end(&mut j, "the destination had confirmed the commit", false),
            _ => {}
        }
        match force {
            Some(Force::Resume) => return self.resume(&mut j, "the operator says the destination holds no copy"),
            Some(Force::End) => return self.end(&mut j, "the operator says the destination runs the workload", false),
            None => {}
        }
        if let (Reach::None, Some(to), Some(d)) = (&reach, j.to.clone(), self.dialer.clone()) {
            reach = Reach::Addr(to, d);
        }
        let deadline = Instant::now() + patience;
        let mut last = String::from("the destination was not asked");
        loop {
            let answer = match &mut reach {
                Reach::Addr(a, d) => Some(ask(d, a, session, Decision::Commit, Duration::from_secs(10))),
                Reach::Channel(_) => match std::mem::replace(&mut reach, Reach::None) {
                    Reach::Channel(ch) => Some(ask_on(ch, session, Decision::Commit, Duration::from_secs(10))),
                    _ => None,
                },
                Reach::None => None,
            };
            match answer {
                Some(Ok(r)) => match SessionState::try_from(r.state).unwrap_or(SessionState::StateUnknown) {
                    SessionState::StateCommitted => {
                        return self.end(&mut j, "the destination runs the workload", false)
                    }
                    SessionState::StateAborted | SessionState::StateUnknown => {
                        return self.resume(&mut j, &format!("the destination holds no copy ({})", r.detail))
                    }
                    SessionState::StateLost => return self.end(&mut j, "the destination lost the workload", true),
                    SessionState::StateHeld | SessionState::StateActive => last = r.detail,
                },
                Some(Err(e)) => last = e.to_string(),
                None => {}
            }
            if matches!(reach, Reach::None) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if j.state != SourceState::InDoubt {
            let note = format!("in doubt: {last}");
            self.write(&mut j, SourceState::InDoubt, &note)?;
        }
        let copies = if j.handover == "restart" {
            "The workload is stopped on this host, its files intact; the destination may have started it.".to_string()
        } else if j.hold.is_some() {
            "The source's copy is kept frozen on this host; the destination may run the workload.".to_string()
        } else {
            format!(
                "The source's copy is its image set in {}; the destination may run the workload.",
                j.final_round.clone().unwrap_or_default().display()
            )
        };
        let how = match &j.to {
            Some(a) => format!(" (at {a})"),
            None => " (with --fdrpc naming a new connection to the destination's `phaul serve --fdrpc`)".into(),
        };
        Err(ResolveError::StillInDoubt { session: session.into(), detail: last, copies, how })
    }
}

/// Settles the destination's side of `session` (`phaul resolve` there): brings the journal up to date and, with
/// `discard`, kills a copy that runs here (the operator has decided the source's copy counts).
pub fn settle_destination_session(
    journals: &Journals,
    session: &str,
    discard: bool,
) -> Result<DestinationJournal, ResolveError> {
    let mut j: DestinationJournal = journals
        .read(session)?
        .ok_or_else(|| JournalError::NotFound { session: session.into(), dir: journals.dir().to_path_buf() })?;
    settle_destination(journals, &mut j)?;
    if discard && matches!(j.state, DestinationState::Committed | DestinationState::Held) {
        if let Some(p) = j.restored.filter(|p| p.alive()) {
            kill_restored_tree(p.pid);
        }
        j.state = DestinationState::Aborted;
        j.note = "discarded by the operator (phaul resolve --discard)".into();
        journals.write(&mut j)?;
    }
    Ok(j)
}

/// The guard's wait: returns what its parent said last, or `None` if the parent died without saying `done` or
/// `in-doubt`.
pub fn guard_wait(watch: OwnedFd) -> Option<String> {
    let mut f = std::fs::File::from(watch);
    let mut buf = String::new();
    let mut chunk = [0u8; 64];
    loop {
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    buf.lines().last().map(str::to_string).filter(|l| l == "done" || l == "in-doubt")
}

/// Where a session's journal lives, from its path: (state directory, session id).
pub fn journal_location(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    let session = name.strip_suffix(".source.json")?;
    Some((path.parent()?.to_path_buf(), session.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(state: DestinationState, restart: bool) -> DestinationJournal {
        DestinationJournal {
            session: "0123456789abcdef0123456789abcdef".into(),
            state,
            htype: "cmd".into(),
            id: "w".into(),
            image_dir: PathBuf::from("/nonexistent"),
            restored: None,
            criu_pid: None,
            peer: None,
            restart,
            note: String::new(),
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn a_restart_mode_start_without_a_pid_stays_in_doubt() {
        let d = tempfile::tempdir().expect("tempdir");
        let journals = Journals::open(d.path()).expect("journals");
        let mut j = journal(DestinationState::CommitReceived, true);
        settle_destination(&journals, &mut j).expect("settle");
        assert_eq!(j.state, DestinationState::CommitReceived);
        assert!(j.note.starts_with("in doubt"), "{}", j.note);
        assert_eq!(state_of(&j), SessionState::StateActive);
        // Settling again changes nothing.
        let note = j.note.clone();
        settle_destination(&journals, &mut j).expect("settle again");
        assert_eq!((j.state, j.note.as_str()), (DestinationState::CommitReceived, note.as_str()));
    }

    #[test]
    fn a_criu_commit_whose_copy_is_gone_is_aborted() {
        let d = tempfile::tempdir().expect("tempdir");
        let journals = Journals::open(d.path()).expect("journals");
        let mut j = journal(DestinationState::CommitReceived, false);
        settle_destination(&journals, &mut j).expect("settle");
        assert_eq!(j.state, DestinationState::Aborted);
    }
}
