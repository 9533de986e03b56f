//! Each side's small, fsync'd record of a session's state, so that a restarted `phaul serve`, the source's guard
//! or `phaul resolve` can tell what happened to the workload after a process died or a link was cut.
//!
//! One JSON file per session and side, `STATE_DIR/SESSION.source.json` or `SESSION.destination.json`, replaced
//! atomically (written beside, fsync'd, renamed over, directory fsync'd) at every transition that matters for the
//! exactly-one-copy promise. docs/protocol.md lists the states and transitions.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hold::HoldRecord;

/// Where session journals go unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/phaul/sessions";

/// The largest journal file read (they are a few KiB).
const MAX_JOURNAL: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the session state directory {dir}: {source}; choose another with --state-dir")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot record the session state in {path}: {source}; the migration stops here (check the space and permissions of --state-dir)")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read the session journal {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the session journal {path} is not readable as a phaul journal: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no journal of session {session} in {dir}; is this the host (and --state-dir) that took part in it?")]
    NotFound { session: String, dir: PathBuf },
    #[error("{0:?} is not a session id (32 lowercase hex digits)")]
    BadSession(String),
}

/// Where the source's session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceState {
    /// Nothing is frozen; the workload runs here.
    Running,
    /// The workload is frozen (inside CRIU's dump, or held by phaul's freezer); nothing was committed, so it may
    /// be resumed.
    Frozen,
    /// Sequential handover: the tree has ended; the source's copy is its complete image set. Nothing committed.
    ImagesOnly,
    /// Restart mode: the workload is stopped (or being stopped) on the source; its files are the copy. Nothing
    /// committed: it may be started here again.
    Stopped,
    /// `Commit` was decided (and perhaps sent): the point of no return. Never resumed by itself from here.
    Committing,
    /// The destination confirmed that the workload runs there; the source's copy is being ended.
    Committed,
    /// Done: the workload runs on the destination and the source's copy is gone.
    Migrated,
    /// Done: the workload runs here (resumed, or restored from the source's own images).
    RolledBack,
    /// Given up learning the outcome: the source's copy is kept (frozen, or as images) until `phaul resolve`.
    InDoubt,
    /// Post-copy: the workload ran on the destination and could not be completed there.
    Lost,
}

impl SourceState {
    /// Whether the session needs nothing more.
    pub fn is_final(self) -> bool {
        matches!(self, SourceState::Migrated | SourceState::RolledBack | SourceState::Lost)
    }
}

/// Where the destination's session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationState {
    /// Set up, receiving; nothing restored.
    Active,
    /// A restored copy exists, held inside CRIU's post-restore notification; it has not run.
    Held,
    /// `Commit` arrived; the held copy is being let run.
    CommitReceived,
    /// The copy runs here.
    Committed,
    /// No copy here (never restored, or discarded before it ran).
    Aborted,
    /// Post-copy: the copy ran here and was lost.
    Lost,
}

/// A process identified across pid reuse: its pid and its start time (field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

/// The source's journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceJournal {
    pub session: String,
    pub state: SourceState,
    pub htype: String,
    pub id: String,
    /// `overlap` or `sequential`.
    pub handover: String,
    /// The destination's `--to` address, for reconnecting; none with handed-in descriptors.
    pub to: Option<String>,
    /// The source's image directory (in a sequential handover, the final round in it is the source's copy).
    pub image_dir: PathBuf,
    /// The final round's directory, once dumped.
    pub final_round: Option<PathBuf>,
    pub root: Option<ProcId>,
    /// What phaul holds the frozen tree with, once engaged.
    pub hold: Option<HoldRecord>,
    /// The guard process watching this session, while there is one.
    pub guard_pid: Option<u32>,
    /// Whether the pty data CRIU drained at dump time was written back (it must be, once, before the tree runs).
    #[serde(default)]
    pub tty_written_back: bool,
    /// The host type's options (for restoring the image set on the source, in a sequential handover).
    #[serde(default)]
    pub htype_options: Vec<(String, String)>,
    /// A sentence for the operator: what happened last.
    pub note: String,
    pub updated_unix_ms: u64,
}

/// The destination's journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationJournal {
    pub session: String,
    pub state: DestinationState,
    pub htype: String,
    pub id: String,
    pub image_dir: PathBuf,
    /// The restored root, once CRIU named it.
    pub restored: Option<ProcId>,
    /// The CRIU process restoring it (the hold ends when it does).
    pub criu_pid: Option<u32>,
    /// The fingerprint of the certificate of the peer that opened the session (with TLS): only it may ask
    /// about the session later.
    #[serde(default)]
    pub peer: Option<String>,
    /// Restart mode: the host type starts the workload itself, so a `commit-received` session whose start left
    /// no pid behind may still have started it (it stays in doubt instead of being settled as aborted).
    #[serde(default)]
    pub restart: bool,
    pub note: String,
    pub updated_unix_ms: u64,
}

/// A journal kind: where its files go.
pub trait Record: Serialize + for<'de> Deserialize<'de> {
    const SUFFIX: &'static str;
    fn session(&self) -> &str;
    fn touch(&mut self);
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Record for SourceJournal {
    const SUFFIX: &'static str = "source";
    fn session(&self) -> &str {
        &self.session
    }
    fn touch(&mut self) {
        self.updated_unix_ms = now_ms();
    }
}

impl Record for DestinationJournal {
    const SUFFIX: &'static str = "destination";
    fn session(&self) -> &str {
        &self.session
    }
    fn touch(&mut self) {
        self.updated_unix_ms = now_ms();
    }
}

/// Checks a session id: 32 lowercase hex digits (128 random bits). Anything else never becomes a path.
pub fn check_session(s: &str) -> Result<(), JournalError> {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(JournalError::BadSession(s.chars().take(80).collect()))
    }
}

/// The directory of journals.
#[derive(Debug, Clone)]
pub struct Journals {
    dir: PathBuf,
}

impl Journals {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Journals, JournalError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| JournalError::Dir { dir: dir.to_path_buf(), source })?;
        Ok(Journals { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path<R: Record>(&self, session: &str) -> PathBuf {
        self.dir.join(format!("{session}.{}.json", R::SUFFIX))
    }

    /// Writes `rec` durably: when this returns, the state survives a crash of phaul or of the machine.
    pub fn write<R: Record>(&self, rec: &mut R) -> Result<(), JournalError> {
        self.write_with(rec, true)
    }

    /// Writes `rec` atomically but without waiting for the disk: when this returns, the state survives a crash
    /// of phaul (the kernel has it), not of the machine. For records about processes, which do not survive the
    /// machine either, written where every millisecond counts; [`Journals::sync`] makes it durable later.
    pub fn write_volatile<R: Record>(&self, rec: &mut R) -> Result<(), JournalError> {
        self.write_with(rec, false)
    }

    /// Makes the last write of a session's journal of kind `R` durable.
    pub fn sync<R: Record>(&self, session: &str) -> Result<(), JournalError> {
        let path = self.path::<R>(session);
        let err = |source| JournalError::Write { path: path.clone(), source };
        File::open(&path).and_then(|f| f.sync_all()).map_err(err)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)
    }

    fn write_with<R: Record>(&self, rec: &mut R, durable: bool) -> Result<(), JournalError> {
        check_session(rec.session())?;
        rec.touch();
        let path = self.path::<R>(rec.session());
        let err = |source| JournalError::Write { path: path.clone(), source };
        let text = serde_json::to_vec_pretty(rec).map_err(|e| err(io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f =
                OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
            f.write_all(&text).map_err(err)?;
            if durable {
                f.sync_all().map_err(err)?;
            }
        }
        fs::rename(&tmp, &path).map_err(err)?;
        if durable {
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        Ok(())
    }

    /// Reads a session's journal of kind `R`, `None` if there is none.
    pub fn read<R: Record>(&self, session: &str) -> Result<Option<R>, JournalError> {
        check_session(session)?;
        let path = self.path::<R>(session);
        read_file(&path)
    }

    /// Every journal of kind `R` here, oldest first.
    pub fn list<R: Record>(&self) -> Result<Vec<R>, JournalError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| JournalError::Read { path: self.dir.clone(), source })?;
        let suffix = format!(".{}.json", R::SUFFIX);
        let mut out: Vec<(u64, R)> = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(session) = name.strip_suffix(&suffix) else { continue };
            if check_session(session).is_err() {
                continue;
            }
            match read_file::<R>(&e.path()) {
                Ok(Some(r)) => {
                    let t = e.metadata().and_then(|m| m.modified()).ok();
                    let t = t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64);
                    out.push((t.unwrap_or(0), r));
                }
                Ok(None) => {}
                Err(e) => log::warn!("{e}"),
            }
        }
        out.sort_by_key(|(t, _)| *t);
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }
}

fn read_file<R: Record>(path: &Path) -> Result<Option<R>, JournalError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JournalError::Read { path: path.to_path_buf(), source }),
    };
    if meta.len() > MAX_JOURNAL {
        return Err(JournalError::Parse {
            path: path.to_path_buf(),
            message: format!("{} bytes is too large", meta.len()),
        });
    }
    let text = fs::read(path).map_err(|source| JournalError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| JournalError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

/// Reads /proc/PID/stat's start time (clock ticks since boot); `None` if the process does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // After the comm: state is field 3 of the line, starttime field 22, so index 19 here.
    after.split_whitespace().nth(19)?.parse().ok()
}

impl ProcId {
    /// The process `pid` as it is now.
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start_time| ProcId { pid, start_time })
    }

    /// Whether this very process still exists and is not a zombie.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && crate::sys::pid_alive(self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(session: &str) -> DestinationJournal {
        DestinationJournal {
            session: session.into(),
            state: DestinationState::Held,
            htype: "pid".into(),
            id: "1".into(),
            image_dir: "/x".into(),
            restored: Some(ProcId { pid: 5, start_time: 6 }),
            criu_pid: Some(7),
            peer: None,
            restart: false,
            note: String::new(),
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn write_read_list() {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journals::open(&d.path().join("s")).expect("open");
        let s = "0123456789abcdef0123456789abcdef";
        let mut r = sample(s);
        j.write(&mut r).expect("write");
        let back: DestinationJournal = j.read(s).expect("read").expect("some");
        assert_eq!(back.state, DestinationState::Held);
        assert_eq!(back.restored, Some(ProcId { pid: 5, start_time: 6 }));
        assert_eq!(j.list::<DestinationJournal>().expect("list").len(), 1);
        assert!(j.list::<SourceJournal>().expect("list").is_empty());
    }

    #[test]
    fn session_ids_never_become_odd_paths() {
        assert!(check_session("../../etc/passwd").is_err());
        assert!(check_session("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(check_session("0123456789abcdef0123456789abcdef").is_ok());
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journals::open(d.path()).expect("open");
        assert!(j.read::<SourceJournal>("../x").is_err());
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = ProcId::of(std::process::id() as i32).expect("self");
        assert!(me.alive());
        assert!(!ProcId { pid: me.pid, start_time: me.start_time + 1 }.alive());
    }
}
