//! The source side of a migration (`phaul migrate`), in phases: prepare (everything local, before the
//! destination is contacted), connect, greet, set up, pre-copy (memory and filesystem rounds while the workload
//! runs), hand over (one [`handover::Ending`] per way of ending), confirm.
//!
//! Invariant: at every instant at least one copy of the workload exists and at most one runs. Until the source
//! sends `Commit` (the point of no return) any failure resumes the source's copy. From then on the source never
//! resumes it by itself: it keeps it (frozen by phaul's own freezer, or as its image set) until it has learnt what
//! the destination holds, reconnecting by session for `--resolve-timeout`, and otherwise ends *in doubt*, saying
//! which copy exists where and how to resolve it (`phaul resolve`).

mod handover;
mod restart;

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::std_types::RResult;
use phaul_abi::{CriuStage, Outcome, PluginError};
use phaul_proto::criu::{CriuOpts, CriuPageServerInfo, CriuReqType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{
    self as w, ChannelKind, ChannelOpen, CpuCheck, EndRound, FsRoundDone, Hello, KeyValue, Setup, StartRound,
};
use phaul_proto::PROTOCOL_VERSION;

use super::control::{Control, Deadline};
use super::files::{self, FileTransferError};
use super::policy::{self, OnNoConverge, Policy, RoundSample, StopReason};
use super::report::{ChannelBytes, HandoverReport, MemoryStrategy, Report, RoundReport};
use super::{fault, page_size, private_dir, sanitize, Phase, Progress, StatusSink};
use crate::criu::{build_opts, rpc, CriuBackend, CriuError, Features, Version, MIN_CRIU};
use crate::expect_reply;
use crate::hold::{HoldError, Keeper};
use crate::images::{self, ImageError};
use crate::journal::{JournalError, Journals, ProcId, SourceJournal, SourceState};
use crate::plugins::{Drivers, PluginLoadError};
use crate::sys;
use crate::transport::{self, Channel, ChannelName, TransportError};
use crate::wire::{self, WireError};

/// Filesystem rounds while the workload runs without memory rounds stop once one moved less than this, or after
/// [`MAX_LIVE_FS_ROUNDS`] (see [`SourceRun::live_fs_rounds`]).
const SMALL_FS_ROUND_BYTES: u64 = 1 << 20;
const MAX_LIVE_FS_ROUNDS: u32 = 3;

/// `--pre-dump`: whether to run pre-copy rounds before the final dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreDump {
    /// When CRIU can track memory on this kernel and the host type allows it.
    Auto,
    /// Always; fail before touching the workload when it cannot be done.
    On,
    /// Never: stop-and-copy.
    Off,
}

/// `--handover`: the order in which the two copies hand over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverOrder {
    /// Sequential when the filesystem is shared and the tree holds something a restore beside its frozen self
    /// would disturb (file locks, bound unix sockets, FIFOs); overlap otherwise.
    Auto,
    Overlap,
    Sequential,
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub htype: String,
    pub id: String,
    pub htype_options: Vec<(String, String)>,
    pub fs: Option<String>,
    pub fs_options: Vec<(String, String)>,
    pub pre_dump: PreDump,
    pub policy: Policy,
    pub on_no_converge: OnNoConverge,
    /// Hybrid: switch to post-copy after this many pre-copy rounds.
    pub post_copy_after: Option<u32>,
    /// `--mode lazy`: post-copy straight away.
    pub lazy: bool,
    /// `--lazy-restore`: the destination restores memory on demand from its own images.
    pub lazy_restore: bool,
    /// `--mode restart`: no checkpoint; filesystem rounds, the host type's `stop` here, the final round, its
    /// `start` on the destination.
    pub restart: bool,
    pub handover: HandoverOrder,
    pub keep_images: bool,
    pub img_path: PathBuf,
    /// Session journals (`--state-dir`).
    pub state_dir: PathBuf,
    pub skip_cpu_check: bool,
    pub skip_criu_check: bool,
    /// Do not declare the expected image size, so the destination does not check its free space against it.
    pub skip_space_check: bool,
    /// The bound on waits for the peer or CRIU while nothing is frozen.
    pub timeout: Duration,
    /// `--max-frozen`: before the point of no return, a freeze longer than this is aborted and the workload
    /// resumed.
    pub max_frozen: Duration,
    /// `--resolve-timeout`: after the point of no return, how long to try to learn the outcome.
    pub resolve_timeout: Duration,
    /// TCP liveness bound on the channels, in seconds (`--link-timeout`).
    pub link_timeout: u32,
    pub progress: bool,
    /// `--status-fd`: JSON status lines (phase, rounds, predictions, journal states) go here.
    pub status: Option<std::sync::Arc<StatusSink>>,
    /// The name of a file the destination writes the restored root pid into, under its `--rpid-dir`.
    pub dst_rpid: Option<String>,
}

/// How the source reaches the destination.
#[derive(Debug)]
pub enum SourceChannels {
    /// Connections handed in by a caller.
    Given { rpc: Channel, mem: Channel, fs: Option<Channel> },
    /// phaul connects to `phaul serve --listen ADDR` itself.
    Connect { addr: String, dialer: transport::Dialer },
}

/// Why a migration failed. In every case the report says which copy exists where.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Plugin(#[from] PluginLoadError),
    #[error("the {role} {kind} driver '{name}' failed: {error}")]
    Driver { role: &'static str, kind: &'static str, name: String, error: PluginError },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Files(#[from] FileTransferError),
    #[error(transparent)]
    Images(#[from] ImageError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("phaul could not hold the frozen source copy: {0}")]
    Hold(#[from] HoldError),
    #[error("cannot create the image directory {path}: {source}; choose another with --img-path")]
    ImageDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}; check the space and permissions under --img-path")]
    WriteImage { path: PathBuf, source: std::io::Error },
    #[error("the destination sent a {what} named {name:?}, which is not a CRIU image name; is it running a compatible phaul?")]
    BadImageName { what: &'static str, name: String },
    #[error("--lazy-restore works with stop-and-copy only: add --pre-dump off, and drop --mode lazy and --post-copy-after (CRIU's lazy-pages daemon cannot load pages kept in a pre-copy round's images; post-copy restores on demand anyway)")]
    LazyRestoreNeedsStopAndCopy,
    #[error("pre-copy was requested with --pre-dump on, but {reason}; use --pre-dump auto or off")]
    PreDumpUnavailable { reason: String },
    #[error("no filesystem driver is chosen for host type '{htype}': pass --fs NAME, or add [host-type.{htype}] fs = \"NAME\" to {config}")]
    NoFsDriver { htype: String, config: PathBuf },
    #[error("the destination speaks phaul protocol version {theirs}, this source speaks {ours}; run the same phaul release on both hosts")]
    Protocol { ours: u32, theirs: u32 },
    #[error("this host's CRIU {found} is older than {min}, the oldest phaul supports; run scripts/setup or point --criu at a newer CRIU")]
    CriuTooOld { found: String, min: String },
    #[error("pre-copy did not converge after {rounds} rounds ({why}) and --on-no-converge abort was given; nothing was frozen and the workload keeps running")]
    NoConvergence { why: &'static str, rounds: u32 },
    #[error(transparent)]
    PostCopy(#[from] super::lazy::LazyError),
    #[error("{0}")]
    Refused(String),
    #[error("the destination ended the session: {message}{}", fmt_lines(criu_errors))]
    DestinationAborted { message: String, criu_errors: Vec<String> },
    #[error("the workload stayed frozen for {secs} s (the --max-frozen bound) while {step}; phaul aborted before the point of no return")]
    FreezeBound { secs: u64, step: String },
    #[error("the outcome is in doubt: {detail}. {copies} Resolve it with `phaul resolve {session}` on this host{how}")]
    InDoubt { session: String, detail: String, copies: String, how: String },
    #[error("post-copy lost the workload: {0}")]
    Lost(String),
}

fn fmt_lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("\n    {l}")).collect()
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Migrated,
    /// The workload runs on the source.
    RolledBack,
    InDoubt,
    Lost,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Migrated => "migrated",
            Ended::RolledBack => "failed",
            Ended::InDoubt => "in-doubt",
            Ended::Lost => "lost",
        }
    }
}

impl SourceConfig {
    /// The mode drivers are told about.
    pub fn abi_mode(&self) -> phaul_abi::Mode {
        if self.restart {
            phaul_abi::Mode::RESTART
        } else {
            phaul_abi::Mode::LIVE
        }
    }

    /// Whether this migration may end in post-copy (then lazy pages are tried out before anything is frozen).
    pub fn may_post_copy(&self) -> bool {
        self.lazy || self.post_copy_after.is_some() || self.on_no_converge == OnNoConverge::PostCopy
    }
}

impl MigrateError {
    fn driver(role: &'static str, kind: &'static str, name: &str, error: PluginError) -> Self {
        MigrateError::Driver { role, kind, name: name.to_string(), error }
    }
}

fn plugin<T>(r: RResult<T, PluginError>, kind: &'static str, name: &str) -> Result<T, MigrateError> {
    r.into_result().map_err(|e| MigrateError::driver("source", kind, name, e))
}

fn kvs(v: &[(String, String)]) -> Vec<KeyValue> {
    v.iter().map(|(k, v)| KeyValue { key: k.clone(), value: v.clone() }).collect()
}

fn wire_version(v: &Version) -> w::CriuVersion {
    w::CriuVersion { major: v.major, minor: v.minor, sublevel: v.sublevel, text: v.to_string() }
}

/// Starts a guard for a session: a process that outlives this one and, if this one dies before the session is
/// over, settles the source's copy as the journal says (`phaul migrate` passes one that re-runs phaul).
pub trait GuardSpawner: Send + Sync {
    fn spawn(&self, journal: &Path) -> std::io::Result<Guard>;
}

/// A running guard: told `done` when this process settled the session itself.
pub struct Guard {
    pub pid: u32,
    pub tell: Box<dyn FnMut(&str) + Send>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("pid", &self.pid).finish()
    }
}

/// What the source engine works with.
pub struct SourceContext<'a> {
    pub drivers: &'a dyn Drivers,
    pub criu: &'a dyn CriuBackend,
    pub keeper: Box<dyn Keeper + 'a>,
    pub guards: Option<&'a dyn GuardSpawner>,
}

/// Runs one migration. Always returns a report; the error, if any, is also in the report.
pub fn migrate(
    ctx: SourceContext<'_>,
    cfg: &SourceConfig,
    channels: SourceChannels,
) -> (Report, Ended, Result<(), MigrateError>) {
    let started = Instant::now();
    crate::plugins::services::clear_plugin_progress();
    let mut run = SourceRun::new(cfg, ctx);
    let result = run.run(channels);
    let ended = run.ended(&result);
    let copies = run.copies(ended);
    let mut report = std::mem::replace(&mut run.report, Report::empty());
    report.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    report.plugin_progress = crate::plugins::services::plugin_progress();
    report.outcome = ended.as_str();
    report.copies = copies;
    if let Err(e) = &result {
        report.error = Some(e.to_string());
        // Nothing was dumped yet: do not leave an empty directory behind. Anything CRIU wrote is kept.
        if let Some(dir) = report.source_images.clone().map(PathBuf::from) {
            let _ = std::fs::remove_dir_all(dir.join("cpuinfo"));
            if std::fs::remove_dir(&dir).is_ok() {
                report.source_images = None;
            }
        }
        report.images_kept = report.source_images.is_some();
    }
    if let Some(g) = run.guard.as_mut() {
        (g.tell)("done");
    }
    (report, ended, result)
}

/// Everything a running migration holds.
pub(super) struct Live {
    pub control: Control,
    pub mem: Channel,
    pub fs_ch: Option<Channel>,
    pub htype: phaul_abi::HostTypeBox,
    pub fs: SharedFs,
    pub fs_name: String,
    pub root_pid: i32,
    pub dir: PathBuf,
    pub session: String,
    /// Where to reconnect (phaul's own connections), and how.
    pub to: Option<(String, transport::Dialer)>,
}

/// The filesystem sender, shared with the thread that runs a round while a memory round goes on.
#[derive(Clone)]
pub(super) struct SharedFs(Arc<std::sync::Mutex<phaul_abi::FsSenderBox>>);

impl SharedFs {
    fn lock(&self) -> std::sync::MutexGuard<'_, phaul_abi::FsSenderBox> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn start(&self) -> RResult<(), PluginError> {
        self.lock().start()
    }
    pub fn round(&self, info: &phaul_abi::FsRoundInfo) -> RResult<phaul_abi::FsRound, PluginError> {
        self.lock().round(info)
    }
    pub fn persistent_inodes(&self) -> bool {
        self.lock().persistent_inodes()
    }
    pub fn shares_storage(&self) -> bool {
        self.lock().shares_storage()
    }
    /// The end (waits for a round still running in its thread).
    pub fn finish(&self, outcome: Outcome) -> RResult<(), PluginError> {
        self.lock().finish(outcome)
    }
}

/// A filesystem round under way ([`SourceRun::fs_round_start`]).
pub(super) struct FsRoundRun {
    round: u32,
    frozen: bool,
    started: Instant,
    /// The sender's half, in its thread (with a destination that knows `FsRoundStart`); `None`: it runs in
    /// [`SourceRun::fs_round_finish`].
    sender: Option<std::thread::JoinHandle<RResult<phaul_abi::FsRound, PluginError>>>,
}

pub(super) struct SourceRun<'c> {
    pub cfg: &'c SourceConfig,
    pub criu: &'c dyn CriuBackend,
    drivers: &'c dyn Drivers,
    pub keeper: Box<dyn Keeper + 'c>,
    guards: Option<&'c dyn GuardSpawner>,
    pub guard: Option<Guard>,
    pub report: Report,
    pub progress: Progress,
    pub journals: Option<Journals>,
    pub journal: Option<SourceJournal>,
    /// How the migration ended, once known.
    pub ended: Option<Ended>,
    final_fs_round: u32,
    cpuinfo: Option<Vec<u8>>,
    /// What the destination understands beyond the protocol version (`HelloReply.features`).
    dst_features: Vec<String>,
    /// The destination's --timeout, as its HelloReply said.
    dst_timeout: Option<Duration>,
    /// When the workload was frozen, and the deadline the freeze must end by before the point of no return.
    pub freeze: Option<(Instant, Deadline)>,
    order: HandoverOrder,
    /// This host's CRIU version.
    pub criu_version: (u32, u32, u32),
}

impl Report {
    fn empty() -> Report {
        Report {
            outcome: "failed",
            error: None,
            session: String::new(),
            copies: String::new(),
            handover: None,
            htype: String::new(),
            id: String::new(),
            fs_driver: String::new(),
            htype_details: Default::default(),
            mode: "live",
            memory: MemoryStrategy {
                strategy: "stop-and-copy",
                reason: "not decided yet".into(),
                stop_reason: None,
                fallback: None,
            },
            predicted_downtime_ms: None,
            downtime_ms: None,
            post_copy_ms: None,
            lazy_restore: false,
            pages_loaded_ms: None,
            freeze_started: None,
            source_criu: String::new(),
            destination_criu: String::new(),
            rounds: Vec::new(),
            fs_rounds: 0,
            fs_round_list: Vec::new(),
            plugin_progress: Vec::new(),
            outage_ms: None,
            total_ms: 0.0,
            frozen_ms: None,
            restore_ms: None,
            criu_restore_ms: None,
            restore_stats: None,
            channels: ChannelBytes::default(),
            source_pid: None,
            restored_pid: None,
            source_images: None,
            destination_images: None,
            images_kept: false,
        }
    }
}

impl<'c> SourceRun<'c> {
    fn new(cfg: &'c SourceConfig, ctx: SourceContext<'c>) -> Self {
        let mut report = Report::empty();
        report.htype = cfg.htype.clone();
        report.id = cfg.id.clone();
        report.fs_driver = cfg.fs.clone().unwrap_or_default();
        report.lazy_restore = cfg.lazy_restore;
        report.images_kept = cfg.keep_images;
        SourceRun {
            cfg,
            criu: ctx.criu,
            drivers: ctx.drivers,
            keeper: ctx.keeper,
            guards: ctx.guards,
            guard: None,
            progress: Progress::new(cfg.progress, cfg.status.clone()),
            report,
            journals: None,
            journal: None,
            ended: None,
            final_fs_round: 0,
            dst_features: Vec::new(),
            dst_timeout: None,
            cpuinfo: None,
            freeze: None,
            order: cfg.handover,
            criu_version: (0, 0, 0),
        }
    }

    fn ended(&self, r: &Result<(), MigrateError>) -> Ended {
        match (self.ended, r) {
            (Some(e), _) => e,
            (None, Ok(())) => Ended::Migrated,
            (None, Err(_)) => Ended::RolledBack,
        }
    }

    fn copies(&self, ended: Ended) -> String {
        let restored = self.report.restored_pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        match ended {
            Ended::Migrated => format!("the workload runs on the destination{restored}; the source's copy is gone"),
            Ended::RolledBack => "the workload runs on this host (the source); nothing of it runs on the destination".into(),
            Ended::Lost => "the workload is lost: it ran on the destination, which could not complete its memory; both copies are gone and the images are kept".into(),
            Ended::InDoubt if self.cfg.restart => {
                "the workload is stopped on this host, its files intact; the destination may have started it".into()
            }
            Ended::InDoubt => match self.journal.as_ref().map(|j| j.state) {
                Some(SourceState::InDoubt) if self.journal.as_ref().is_some_and(|j| j.hold.is_none()) => format!(
                    "the source's copy is its image set in {}; the destination may run the workload",
                    self.journal.as_ref().and_then(|j| j.final_round.clone()).unwrap_or_default().display()
                ),
                _ => "the source's copy is kept frozen on this host; the destination may run the workload".into(),
            },
        }
    }

    /// Writes the journal's new state (and anything `f` changes) durably.
    pub fn record(
        &mut self,
        state: SourceState,
        note: &str,
        f: impl FnOnce(&mut SourceJournal),
    ) -> Result<(), MigrateError> {
        if let (Some(js), Some(j)) = (self.journals.as_ref(), self.journal.as_mut()) {
            j.state = state;
            j.note = note.to_string();
            f(j);
            js.write(j)?;
        }
        // Told once it is on disk: a reader never sees a state the journal does not hold.
        if self.progress.status().is_some() {
            let name = serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_string));
            self.progress.state(name.as_deref().unwrap_or("unknown"), note);
        }
        Ok(())
    }

    /// The bound on the next wait: `--timeout`, or what is left of `--max-frozen` while frozen.
    pub fn wait(&self) -> Deadline {
        let d = Deadline::after(self.cfg.timeout, "--timeout");
        match &self.freeze {
            Some((_, f)) => d.min(*f),
            None => d,
        }
    }

    fn run(&mut self, channels: SourceChannels) -> Result<(), MigrateError> {
        let prepared = self.prepare()?;
        // Until the destination greeted us nothing was touched: a failure only needs the journal to say so.
        let greeted = self.connect(prepared, channels).and_then(|c| self.greet(c));
        let (p, mut live) = match greeted {
            Ok(g) => g,
            Err(e) => {
                self.ended = Some(Ended::RolledBack);
                let _ = self.record(SourceState::RolledBack, &e.to_string(), |_| {});
                return Err(e);
            }
        };
        let result = self.set_up_and_migrate(&p, &mut live);
        self.tally(&live);
        if result.is_err() && self.ended.is_none() {
            // Nothing was frozen, or the roll-back already happened: tell the destination to drop what it holds.
            self.ended = Some(Ended::RolledBack);
            if live.control.peer_aborted().is_none() {
                let _ = live.control.request(
                    Body::Finish(w::Finish {
                        migrated: false,
                        reason: result.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
                    }),
                    Deadline::after(Duration::from_secs(30).min(self.cfg.timeout), "--timeout"),
                );
            }
            let _ = live.fs.finish(Outcome::ROLLED_BACK);
            finish_htype(self, &mut live, Outcome::ROLLED_BACK);
            let note = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            let _ = self.record(SourceState::RolledBack, &note, |_| {});
        }
        if self.ended == Some(Ended::Migrated) && !self.cfg.keep_images {
            if let Err(e) = std::fs::remove_dir_all(&live.dir) {
                log::warn!("could not remove {}: {e}", live.dir.display());
            }
        }
        live.control.close();
        self.progress.done();
        result
    }

    fn tally(&mut self, live: &Live) {
        let (s, r) = live.control.counters();
        self.report.channels.control = s + r;
        let (ms, _) = live.mem.counters();
        self.report.channels.memory_images = ms;
    }

    /// Phase 1: everything local, checked before the destination is contacted and long before the workload is
    /// touched.
    fn prepare(&mut self) -> Result<Prepared, MigrateError> {
        let cfg = self.cfg;
        if cfg.lazy_restore && (cfg.pre_dump != PreDump::Off || cfg.lazy || cfg.post_copy_after.is_some()) {
            return Err(MigrateError::LazyRestoreNeedsStopAndCopy);
        }
        let session =
            sys::random_hex(16).map_err(|source| MigrateError::ImageDir { path: cfg.img_path.clone(), source })?;
        self.report.session = session.clone();
        let journals = Journals::open(&cfg.state_dir)?;
        private_dir(&cfg.img_path, true)
            .map_err(|source| MigrateError::ImageDir { path: cfg.img_path.clone(), source })?;
        let dir = cfg.img_path.join(format!("{}-{}-{session}-source", sanitize(&cfg.htype), sanitize(&cfg.id)));
        private_dir(&dir, false).map_err(|source| MigrateError::ImageDir { path: dir.clone(), source })?;
        self.report.source_images = Some(dir.display().to_string());
        if cfg.restart && (cfg.lazy || cfg.lazy_restore || cfg.post_copy_after.is_some()) {
            return Err(MigrateError::Refused(
                "--mode restart moves no memory: it cannot be combined with --lazy-restore or --post-copy-after".into(),
            ));
        }
        let (version, features) = if cfg.restart {
            // Restart mode checkpoints nothing: CRIU is neither needed nor asked.
            self.report.source_criu = "not used (restart mode)".into();
            (Version { major: 0, minor: 0, sublevel: 0, gitid: None }, Features { mem_track: false, lazy_pages: false })
        } else {
            let cpu_dir = dir.join("cpuinfo");
            if !cfg.skip_cpu_check {
                private_dir(&cpu_dir, false)
                    .map_err(|source| MigrateError::ImageDir { path: cpu_dir.clone(), source })?;
            }
            let (version, features, cpuinfo) =
                self.criu.preflight((!cfg.skip_cpu_check).then_some(cpu_dir.as_path()))?;
            self.cpuinfo = cpuinfo;
            self.report.source_criu = version.to_string();
            self.criu_version = version.triple();
            if version.triple() < MIN_CRIU {
                return Err(MigrateError::CriuTooOld {
                    found: version.to_string(),
                    min: format!("{}.{}.{}", MIN_CRIU.0, MIN_CRIU.1, MIN_CRIU.2),
                });
            }
            (version, features)
        };
        let mut htype = self.drivers.host_type(
            &cfg.htype,
            phaul_abi::Role::SOURCE,
            cfg.abi_mode(),
            &cfg.id,
            &cfg.htype_options,
            &dir,
        )?;
        if cfg.restart && !htype.can_restart() {
            return Err(MigrateError::Refused(format!(
                "the '{}' host type cannot stop and start its workload, so --mode restart cannot move it; use --mode live",
                cfg.htype
            )));
        }
        let root_pid = plugin(htype.root_pid(), "host type", &cfg.htype)?;
        self.report.source_pid = Some(root_pid);
        let fs_name = match cfg.fs.clone().or_else(|| self.drivers.default_fs(&cfg.htype)) {
            Some(f) => f,
            None => {
                return Err(MigrateError::NoFsDriver { htype: cfg.htype.clone(), config: self.drivers.config_path() })
            }
        };
        self.report.fs_driver = fs_name.clone();
        self.drivers.ensure_fs(&fs_name)?;
        let pre_copy = if cfg.restart { false } else { self.decide_pre_copy(features, htype.can_pre_dump())? };
        if cfg.may_post_copy() {
            // Post-copy is decided now, before anything is frozen: do lazy pages work on this host at all?
            self.progress.phase(Phase::Preflight, "checking that lazy pages work here");
            let criu = crate::criu::Criu::new(self.criu.path().to_path_buf(), self.criu.timeout());
            super::lazy::trial(&criu, &dir.join("lazy-trial"), "this host (the source)")?;
        }
        let fs_roots =
            plugin(htype.fs_roots(), "host type", &cfg.htype)?.into_iter().map(|s| s.into_string()).collect::<Vec<_>>();
        let mut journal = SourceJournal {
            session: session.clone(),
            state: SourceState::Running,
            htype: cfg.htype.clone(),
            id: cfg.id.clone(),
            handover: if cfg.restart { "restart".into() } else { String::new() },
            to: None,
            image_dir: dir.clone(),
            final_round: None,
            root: ProcId::of(root_pid),
            hold: None,
            guard_pid: None,
            tty_written_back: false,
            htype_options: cfg.htype_options.clone(),
            note: "prepared".into(),
            updated_unix_ms: 0,
        };
        journals.write(&mut journal)?;
        self.journals = Some(journals);
        self.journal = Some(journal);
        Ok(Prepared { session, dir, version, htype: Some(htype), root_pid, fs_name, fs_roots, pre_copy })
    }

    /// Phase 2: the channels, handed in or phaul's own TCP (all three opened now; the memory and filesystem ones
    /// say which session they belong to).
    fn connect(&mut self, mut p: Prepared, channels: SourceChannels) -> Result<(Prepared, Live), MigrateError> {
        let htype = p.htype.take().ok_or_else(|| MigrateError::Refused("the host type was taken twice".into()))?;
        let (rpc, mem, fs_ch, to) = match channels {
            SourceChannels::Given { rpc, mem, fs } => (rpc, mem, fs, None),
            SourceChannels::Connect { addr, dialer } => {
                // The three connections are opened at once (each with its TLS handshake): a relay or tunnel may
                // pass them on only once it has all of them, and in any order.
                let (t, lt) = (Duration::from_secs(10), self.cfg.link_timeout);
                let open = |name, kind: Option<ChannelKind>| -> Result<Channel, MigrateError> {
                    let mut c = dialer.dial(&addr, name, t, lt)?;
                    if let Some(kind) = kind {
                        let body = Body::ChannelOpen(ChannelOpen { session: p.session.clone(), kind: kind as i32 });
                        wire::send(&mut c, body)?;
                    }
                    Ok(c)
                };
                let (rpc, mem, fs) = std::thread::scope(|sc| {
                    let r = sc.spawn(|| open(ChannelName::Rpc, None));
                    let m = sc.spawn(|| open(ChannelName::Mem, Some(ChannelKind::ChannelMemory)));
                    let f = sc.spawn(|| open(ChannelName::Fs, Some(ChannelKind::ChannelFs)));
                    let join = |h: std::thread::ScopedJoinHandle<'_, Result<Channel, MigrateError>>| {
                        h.join().unwrap_or_else(|_| Err(MigrateError::Refused("a connecting thread panicked".into())))
                    };
                    (join(r), join(m), join(f))
                });
                (rpc?, mem?, Some(fs?), Some((addr, dialer)))
            }
        };
        for c in [Some(&rpc), Some(&mem), fs_ch.as_ref()].into_iter().flatten() {
            let _ = c.set_liveness(self.cfg.link_timeout);
        }
        let _ = mem.set_read_timeout(self.cfg.timeout);
        let fs_fd = fs_ch.as_ref().map(|c| c.as_fd().as_raw_fd());
        let fs = self.drivers.fs_sender(
            &p.fs_name,
            self.cfg.abi_mode(),
            &self.cfg.fs_options,
            fs_fd,
            &p.fs_roots,
            &p.dir,
        )?;
        let control = Control::new(rpc).map_err(|source| TransportError::Setup { channel: "control", source })?;
        let to2 = to.as_ref().map(|(a, _)| a.clone());
        let _ = self.record(SourceState::Running, "connected", |j| j.to = to2);
        let live = Live {
            control,
            mem,
            fs_ch,
            htype,
            fs: SharedFs(Arc::new(std::sync::Mutex::new(fs))),
            fs_name: p.fs_name.clone(),
            root_pid: p.root_pid,
            dir: p.dir.clone(),
            session: p.session.clone(),
            to,
        };
        Ok((p, live))
    }

    /// Phase 3: the greeting.
    fn greet(&mut self, (p, mut live): (Prepared, Live)) -> Result<(Prepared, Live), MigrateError> {
        self.progress.phase(Phase::Setup, "greeting the destination");
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            phaul_version: env!("CARGO_PKG_VERSION").into(),
            criu: Some(wire_version(&p.version)),
            session: p.session.clone(),
            skip_criu_check: self.cfg.skip_criu_check,
            timeout_ms: self.cfg.timeout.as_millis() as u64,
        };
        let reply = expect_reply!(live.control.request(Body::Hello(hello), self.wait())?, HelloReply)?;
        if reply.protocol_version != PROTOCOL_VERSION {
            return Err(MigrateError::Protocol { ours: PROTOCOL_VERSION, theirs: reply.protocol_version });
        }
        self.report.destination_criu = reply.criu.map(|v| v.text).unwrap_or_else(|| "unknown".into());
        self.dst_features = reply.features;
        self.dst_timeout = (reply.timeout_ms > 0).then(|| Duration::from_millis(reply.timeout_ms));
        Ok((p, live))
    }

    fn set_up_and_migrate(&mut self, p: &Prepared, live: &mut Live) -> Result<(), MigrateError> {
        self.set_up(p, live)?;
        if self.cfg.restart {
            return restart::restart(self, live);
        }
        let plan = self.pre_copy(p, live)?;
        self.hand_over(live, plan)
    }

    /// Phase 4: the destination's CPU check and set-up.
    fn set_up(&mut self, p: &Prepared, live: &mut Live) -> Result<(), MigrateError> {
        let cfg = self.cfg;
        if let Some(image) = self.cpuinfo.take() {
            self.progress.phase(Phase::Preflight, "checking the destination's CPU");
            expect_reply!(
                live.control.request(Body::CpuCheck(CpuCheck { cpuinfo_image: image }), self.wait())?,
                CpuCheckReply
            )?;
        }
        let order = if cfg.restart { HandoverOrder::Sequential } else { self.decide_order(live)? };
        let setup = Setup {
            htype: cfg.htype.clone(),
            id: cfg.id.clone(),
            mode: if cfg.restart { w::Mode::Restart as i32 } else { w::Mode::Live as i32 },
            htype_options: kvs(&cfg.htype_options),
            fs_driver: live.fs_name.clone(),
            fs_options: kvs(&cfg.fs_options),
            fs_roots: p.fs_roots.clone(),
            keep_images: cfg.keep_images,
            has_fs_channel: live.fs_ch.is_some(),
            dst_rpid: cfg.dst_rpid.clone().unwrap_or_default(),
            post_copy: cfg.may_post_copy(),
            lazy_restore: cfg.lazy_restore,
            handover: if order == HandoverOrder::Sequential {
                w::Handover::Sequential as i32
            } else {
                w::Handover::Overlap as i32
            },
            max_frozen_ms: cfg.max_frozen.as_millis() as u64,
            // Restart mode sends no images, and post-copy's pages go to the destination's memory, not its disk.
            expected_image_bytes: if cfg.restart || cfg.lazy || cfg.skip_space_check {
                0
            } else {
                crate::hold::procs::tree_resident_bytes(live.root_pid)
            },
        };
        if let Some(st) = self.progress.status() {
            st.emit(
                "plan",
                serde_json::json!({
                    "htype": setup.htype, "id": setup.id, "fs_driver": setup.fs_driver, "fs_roots": setup.fs_roots,
                    "handover": if order == HandoverOrder::Sequential { "sequential" } else { "overlap" },
                    "expected_image_bytes": setup.expected_image_bytes,
                    "max_frozen_ms": setup.max_frozen_ms,
                }),
            );
        }
        let reply = expect_reply!(live.control.request(Body::Setup(setup), self.wait())?, SetupReply)?;
        self.report.destination_images = Some(reply.image_dir);
        plugin(live.fs.start(), "filesystem", &live.fs_name)?;
        Ok(())
    }

    /// Chooses the handover order (before anything is frozen).
    fn decide_order(&mut self, live: &mut Live) -> Result<HandoverOrder, MigrateError> {
        let shared = live.fs.shares_storage();
        let holds = handover::shared_state_of_tree(live.root_pid);
        let (order, reason) = match (self.cfg.handover, shared, holds.is_empty()) {
            (HandoverOrder::Overlap, true, false) => {
                return Err(MigrateError::Refused(format!(
                    "the workload holds {} on storage both hosts share ({} driver), and with --handover overlap the destination would restore beside the frozen source, which still holds them (a restore would wait for its locks, unlink its socket files, share its FIFOs); use --handover sequential or auto",
                    holds.join(", "),
                    live.fs_name
                )))
            }
            (HandoverOrder::Overlap, _, _) => (HandoverOrder::Overlap, "--handover overlap".to_string()),
            (HandoverOrder::Sequential, _, _) => (HandoverOrder::Sequential, "--handover sequential".to_string()),
            (HandoverOrder::Auto, true, false) => (
                HandoverOrder::Sequential,
                format!(
                    "the workload holds {} on storage both hosts share ('{}'): its tree ends before the destination restores, and its image set is the source's copy until then",
                    holds.join(", "),
                    live.fs_name
                ),
            ),
            (HandoverOrder::Auto, true, true) => {
                (HandoverOrder::Overlap, "shared storage, but the workload holds no file locks, unix socket files or FIFOs".into())
            }
            (HandoverOrder::Auto, false, _) => {
                (HandoverOrder::Overlap, format!("the '{}' driver gives the destination its own files", live.fs_name))
            }
        };
        if order == HandoverOrder::Sequential && self.cfg.may_post_copy() {
            return Err(MigrateError::Refused(format!(
                "post-copy needs the source's tree alive until its last page is served, but this migration needs the sequential handover ({reason}); migrate without --mode lazy, --post-copy-after and --on-no-converge post-copy"
            )));
        }
        self.order = order;
        let ending = handover::ending_name(self.cfg, false);
        self.report.handover = Some(HandoverReport {
            ending,
            order: if order == HandoverOrder::Sequential { "sequential" } else { "overlap" },
            order_reason: reason,
            committed: false,
            commit_sent_ms: None,
            commit_rtt_ms: None,
            destination_aborted: None,
        });
        let name = if order == HandoverOrder::Sequential { "sequential" } else { "overlap" };
        let _ = self.record(SourceState::Running, "set up", |j| j.handover = name.to_string());
        Ok(order)
    }

    fn decide_pre_copy(&mut self, f: Features, htype_allows: bool) -> Result<bool, MigrateError> {
        if self.cfg.lazy {
            self.report.memory = MemoryStrategy {
                strategy: "post-copy",
                reason: "--mode lazy".into(),
                stop_reason: None,
                fallback: None,
            };
            return Ok(false);
        }
        let missing = if !f.mem_track {
            Some("CRIU reports that this kernel cannot track dirty memory (it needs CONFIG_MEM_SOFT_DIRTY)".to_string())
        } else if !htype_allows {
            Some(format!("the '{}' host type does not allow pre-dumps", self.cfg.htype))
        } else {
            None
        };
        let (pre, reason) = match (self.cfg.pre_dump, missing) {
            (PreDump::Off, _) => (false, "--pre-dump off".to_string()),
            (PreDump::On, Some(reason)) => return Err(MigrateError::PreDumpUnavailable { reason }),
            (PreDump::On, None) => (true, "--pre-dump on".to_string()),
            (PreDump::Auto, Some(reason)) => (false, reason),
            (PreDump::Auto, None) => (true, "memory tracking is available".to_string()),
        };
        self.report.memory = MemoryStrategy {
            strategy: if pre { "pre-copy" } else { "stop-and-copy" },
            reason,
            stop_reason: None,
            fallback: None,
        };
        Ok(pre)
    }

    /// Phase 5: pre-copy rounds while the workload runs (or the one filesystem round of stop-and-copy). Returns
    /// the plan of the handover.
    fn pre_copy(&mut self, p: &Prepared, live: &mut Live) -> Result<Plan, MigrateError> {
        let cfg = self.cfg;
        // Memory rounds and filesystem rounds are numbered separately; each pre-dump round is followed by one
        // filesystem round, and stop-and-copy still syncs the filesystem once while the workload runs.
        let mut round = 0u32;
        let mut fs_round = 0u32;
        let mut lazy_final = cfg.lazy;
        if p.pre_copy {
            let mut history: Vec<RoundSample> = Vec::new();
            let mut last_start: Option<Instant> = None;
            loop {
                round += 1;
                let started = Instant::now();
                let interval = last_start.map(|t| started.duration_since(t).as_secs_f64());
                last_start = Some(started);
                // The filesystem round runs alongside the memory round (a big first copy starts at once); a failed
                // memory round leaves its sender to end by itself (the rollback's finish waits for it).
                fs_round += 1;
                let fs_run = self.fs_round_start(live, fs_round, false)?;
                let (stats, secs) = self.memory_round(live, round)?;
                history.push(RoundSample {
                    pages_written: stats.pages_written,
                    duration_s: secs,
                    interval_s: interval.unwrap_or(secs),
                    fs_final_ms: 0.0,
                });
                let rt = policy::rates(&history, page_size());
                if let Some(r) = self.report.rounds.last_mut() {
                    if history.len() >= 2 {
                        r.dirty_rate_mib_s = Some(rt.dirty_bytes_s / (1u64 << 20) as f64);
                    }
                    r.predicted_downtime_ms = rt.predicted_downtime_ms.is_finite().then_some(rt.predicted_downtime_ms);
                }
                self.fs_round_finish(live, fs_run)?;
                // What the filesystem still has to move counts in the frozen time the policy predicts.
                if let (Some(h), Some(f)) = (history.last_mut(), self.report.fs_round_list.last()) {
                    if let Some(left) = f.remaining_bytes {
                        let rate = if f.duration_ms > 0.0 { f.bytes as f64 / (f.duration_ms / 1000.0) } else { 0.0 };
                        h.fs_final_ms = if left == 0 {
                            0.0
                        } else if rate > 0.0 {
                            left as f64 / rate * 1000.0
                        } else {
                            f.duration_ms
                        };
                        let rt = policy::rates(&history, page_size());
                        if let Some(r) = self.report.rounds.last_mut() {
                            r.predicted_downtime_ms =
                                rt.predicted_downtime_ms.is_finite().then_some(rt.predicted_downtime_ms);
                        }
                    }
                }
                if let Some(r) = self.report.rounds.last() {
                    let dirty = r.dirty_rate_mib_s.map(|m| m * (1u64 << 20) as f64);
                    let (n, predicted) = (r.round, r.predicted_downtime_ms);
                    self.progress.prediction(n, predicted, dirty);
                }
                let why = match cfg.post_copy_after {
                    Some(n) if round >= n => Some(StopReason::PostCopyAfter),
                    _ => policy::should_stop(&cfg.policy, &history, page_size()),
                };
                if let Some(why) = why {
                    self.report.memory.stop_reason = Some(why.describe().to_string());
                    self.report.predicted_downtime_ms = self.report.rounds.last().and_then(|r| r.predicted_downtime_ms);
                    if why.is_non_convergence() {
                        match cfg.on_no_converge {
                            OnNoConverge::StopAndCopy => {
                                self.report.memory.fallback = Some("stop-and-copy".into());
                            }
                            OnNoConverge::Abort => {
                                return Err(MigrateError::NoConvergence { why: why.describe(), rounds: round });
                            }
                            OnNoConverge::PostCopy => {
                                self.report.memory.fallback = Some("post-copy".into());
                                self.report.memory.strategy = "hybrid";
                                lazy_final = true;
                            }
                        }
                    } else if why == StopReason::PostCopyAfter {
                        self.report.memory.strategy = "hybrid";
                        lazy_final = true;
                    }
                    break;
                }
            }
        } else {
            fs_round = self.live_fs_rounds(live, "syncing the filesystem")?;
        }
        self.final_fs_round = fs_round + 1;
        let ending = handover::ending_name(self.cfg, lazy_final);
        if let Some(h) = self.report.handover.as_mut() {
            h.ending = ending;
        }
        Ok(Plan { round: round + 1, pre_copied: p.pre_copy, lazy_final, order: self.order })
    }

    /// Phase 6: the final dump and the handover, by the chosen ending.
    fn hand_over(&mut self, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        let mut ending = handover::ending_for(self.cfg, &plan);
        log::info!("handing over by {}", ending.name());
        ending.run(self, live, plan)
    }

    pub fn cork_pusher(&self, live: &Live) -> Option<sys::CorkPusher> {
        live.mem.dup_fd().ok().map(sys::CorkPusher::start)
    }

    pub fn round_dir(&self, live: &Live, round: u32) -> Result<PathBuf, MigrateError> {
        let d = live.dir.join(round.to_string());
        private_dir(&d, false).map_err(|source| MigrateError::ImageDir { path: d.clone(), source })?;
        Ok(d)
    }

    /// CRIU options of a dump or pre-dump into `dir`: the host type's, the tree, and pages to the destination's
    /// page server on the memory channel unless `local`.
    #[allow(clippy::type_complexity)]
    pub fn base_opts(
        &self,
        live: &mut Live,
        dir: &Path,
        log: &str,
        stage: CriuStage,
        local: bool,
    ) -> Result<(CriuOpts, rpc::OpenDir, Vec<(std::os::fd::OwnedFd, i32)>), MigrateError> {
        let (base, open_dir) = rpc::dir_opts(dir, log)?;
        let mut fds = Vec::new();
        let h = plugin(crate::plugins::criu_options(&mut live.htype, stage), "host type", &self.cfg.htype)?;
        let (mut opts, inherited) = build_opts(base, &h)
            .map_err(|source| CriuError::Io { op: "handing CRIU the host type's descriptors", source })?;
        fds.extend(inherited);
        opts.pid = Some(live.root_pid);
        if !live.fs.persistent_inodes() {
            opts.force_irmap = Some(true);
        }
        if !local {
            opts.ps = Some(CriuPageServerInfo { fd: Some(rpc::MEM_FD), ..Default::default() });
            let mem =
                live.mem.dup_fd().map_err(|source| CriuError::Io { op: "handing CRIU the memory channel", source })?;
            fds.push((mem, rpc::MEM_FD));
        }
        Ok((opts, open_dir, fds))
    }

    /// One pre-dump round; returns CRIU's stats and the round's wall time in seconds.
    fn memory_round(&mut self, live: &mut Live, round: u32) -> Result<(images::DumpStats, f64), MigrateError> {
        self.progress.phase(Phase::PreCopy, &format!("round {round}: pre-dump"));
        let local = self.order == HandoverOrder::Sequential;
        let dir = self.round_dir(live, round)?;
        let start = StartRound { round, r#final: false, lazy: false, pages_as_files: local };
        expect_reply!(live.control.request(Body::StartRound(start), self.wait())?, StartRoundReply)?;
        let (mut opts, _open_dir, fds) = self.base_opts(live, &dir, "pre-dump.log", CriuStage::PRE_DUMP, local)?;
        opts.track_mem = Some(true);
        if round > 1 {
            opts.parent_img = Some(format!("../{}", round - 1));
        }
        let t = Instant::now();
        let mut s = self.criu.session(fds, Some(&dir.join("criu-stderr.log")))?;
        s.set_log(dir.join("pre-dump.log"));
        fault::criu_started(s.pid());
        let pusher = if local { None } else { self.cork_pusher(live) };
        live.control.shut_on_abort(&live.mem);
        let r = s.call("PRE_DUMP", rpc::req(CriuReqType::PreDump, Some(opts)), &mut |_, _| Ok(()));
        fault::criu_gone(s.pid());
        drop(pusher);
        drop(s);
        live.control.clear_on_abort();
        if let Err(e) = r {
            return Err(match live.control.peer_aborted() {
                Some(f) => MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors },
                None => e.into(),
            });
        }
        if local {
            // Sequential: the round's pages travel as files while the workload runs.
            let imgs = files::image_files(&dir)?;
            self.send_files(live, round, w::files::Target::Images, imgs)?;
        } else {
            let want_pagemaps = self.cfg.may_post_copy();
            let ended = expect_reply!(
                live.control.request(Body::EndRound(EndRound { round, want_pagemaps }), self.wait())?,
                EndRoundReply
            )?;
            if want_pagemaps {
                keep_pagemaps(&dir, ended)?;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let stats = images::read_dump_stats(&dir)?;
        let r = RoundReport::new(round, "pre-dump", &stats, secs * 1000.0, page_size());
        self.progress.round(round, "pre-dump", r.bytes_written, secs);
        self.report.channels.memory_pages += r.bytes_written;
        self.report.rounds.push(r);
        Ok((stats, secs))
    }

    /// One filesystem round. With a destination that knows `FsRoundStart`, both halves run at once (a streaming
    /// driver needs that) and each side says `Working` while the other waits, so a round may take as long as it
    /// needs while its drivers report progress; without progress, `--timeout` bounds it.
    /// Filesystem rounds while the workload runs, without memory rounds to pace them (stop-and-copy, restart
    /// mode): each round sends what changed during the one before, until a round moved little (the next, frozen,
    /// round will be about as small) or after [`MAX_LIVE_FS_ROUNDS`]. Returns the number of the last round.
    pub fn live_fs_rounds(&mut self, live: &mut Live, phase: &str) -> Result<u32, MigrateError> {
        let mut round = 0;
        while round < MAX_LIVE_FS_ROUNDS {
            round += 1;
            self.progress.phase(Phase::FsRound, phase);
            self.fs_round(live, round, false)?;
            let moved = self.report.fs_round_list.last().map(|r| r.bytes).unwrap_or(0);
            if moved < SMALL_FS_ROUND_BYTES {
                break;
            }
        }
        Ok(round)
    }

    pub fn fs_round(&mut self, live: &mut Live, round: u32, frozen: bool) -> Result<(), MigrateError> {
        let r = self.fs_round_start(live, round, frozen)?;
        self.fs_round_finish(live, r)
    }

    fn streaming_fs(&self) -> bool {
        self.dst_features.iter().any(|f| f == crate::engine::destination::FEATURE_FS_ROUND_START)
    }

    /// Starts a filesystem round; with a destination that knows `FsRoundStart` both halves start now and run in
    /// threads of their own, so that a memory round can go on meanwhile ([`SourceRun::fs_round_finish`] ends it).
    pub fn fs_round_start(&mut self, live: &mut Live, round: u32, frozen: bool) -> Result<FsRoundRun, MigrateError> {
        if frozen {
            fault::at("src", "step", "final-fs-round");
        }
        let started = Instant::now();
        let sender = if self.streaming_fs() {
            live.control.send(Body::FsRoundStart(w::FsRoundStart { round, r#final: frozen }))?;
            let fs = live.fs.clone();
            let info = crate::plugins::fs_round_info(round, frozen);
            Some(std::thread::spawn(move || fs.round(&info)))
        } else {
            None
        };
        Ok(FsRoundRun { round, frozen, started, sender })
    }

    /// Ends a round begun by [`SourceRun::fs_round_start`]: waits for the sender (saying `Working` meanwhile), then
    /// for the destination's receiver.
    pub fn fs_round_finish(&mut self, live: &mut Live, r: FsRoundRun) -> Result<(), MigrateError> {
        let FsRoundRun { round, frozen, started: t, sender } = r;
        let streaming = sender.is_some();
        let moved = match sender {
            Some(h) => {
                let bound = self.dst_timeout.map_or(self.cfg.timeout, |d| d.min(self.cfg.timeout));
                let every = crate::engine::destination::working_every(bound);
                let mut next = Instant::now() + every;
                while !h.is_finished() {
                    std::thread::sleep(Duration::from_millis(5));
                    if Instant::now() >= next {
                        let progress = crate::engine::destination::plugin_progress_total();
                        let _ = live.control.send(Body::Working(w::Working { round, progress }));
                        next = Instant::now() + every;
                    }
                }
                h.join()
                    .map_err(|_| MigrateError::Refused(format!("the filesystem driver '{}' panicked", live.fs_name)))?
            }
            None => live.fs.round(&crate::plugins::fs_round_info(round, frozen)),
        };
        let moved = plugin(moved, "filesystem", &live.fs_name)?;
        let reply = if streaming {
            live.control.send(Body::FsRoundDone(FsRoundDone { round, r#final: frozen }))?;
            let what = format!("FsRoundReply (the destination finishing filesystem round {round})");
            // While frozen, the freeze's own bound (--max-frozen) is the outer one.
            let day = Deadline::after(Duration::from_secs(24 * 3600), "the 24 h bound on a filesystem round");
            let outer = match (frozen, self.freeze) {
                (true, Some((_, d))) => d.min(day),
                _ => day,
            };
            match live.control.recv_working(self.cfg.timeout, outer, &what)? {
                Body::FsRoundReply(r) => r,
                Body::Failure(f) => {
                    return Err(MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors })
                }
                other => {
                    return Err(WireError::Unexpected { expected: "FsRoundReply", got: wire::body_name(&other) }.into())
                }
            }
        } else {
            expect_reply!(
                live.control.request(Body::FsRoundDone(FsRoundDone { round, r#final: frozen }), self.wait())?,
                FsRoundReply
            )?
        };
        let bytes = moved.bytes.max(reply.bytes);
        self.report.fs_rounds += 1;
        self.report.channels.filesystem += bytes;
        self.report.fs_round_list.push(super::report::FsRoundReport {
            round,
            frozen,
            bytes,
            files: moved.files.max(reply.files),
            duration_ms: t.elapsed().as_secs_f64() * 1000.0,
            remaining_bytes: (moved.remaining_bytes != phaul_abi::FsRound::UNKNOWN).then_some(moved.remaining_bytes),
        });
        if let Some(r) = self.report.fs_round_list.last() {
            let (secs, remaining) = (r.duration_ms / 1000.0, r.remaining_bytes);
            self.progress.fs_round(round, frozen, bytes, secs, remaining);
        }
        Ok(())
    }

    pub fn final_fs_round(&self) -> u32 {
        self.final_fs_round
    }

    pub fn send_files(
        &mut self,
        live: &mut Live,
        round: u32,
        target: w::files::Target,
        list: Vec<(PathBuf, w::FileHeader)>,
    ) -> Result<(), MigrateError> {
        let headers = list.iter().map(|(_, h)| h.clone()).collect();
        live.control.send(Body::Files(w::Files { round, target: target as i32, files: headers }))?;
        files::send_files(&mut live.mem, &list)?;
        let reply = live.control.recv(self.wait(), "Files (the destination storing the images)")?;
        match reply {
            Body::FilesReply(_) => Ok(()),
            Body::Failure(f) => {
                Err(MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors })
            }
            other => Err(WireError::Unexpected { expected: "FilesReply", got: wire::body_name(&other) }.into()),
        }
    }

    /// The files the host type wants beside the images (a container's configuration), sent to the destination's
    /// extra-files directory.
    pub fn send_extra_files(&mut self, live: &mut Live, round: u32) -> Result<(), MigrateError> {
        let extra = plugin(live.htype.extra_files(), "host type", &self.cfg.htype)?;
        if extra.is_empty() {
            return Ok(());
        }
        let list: Vec<(PathBuf, String)> =
            extra.iter().map(|e| (PathBuf::from(e.path.as_str()), e.name.to_string())).collect();
        let hdrs = files::headers_for(&list)?;
        self.send_files(live, round, w::files::Target::Extra, hdrs)
    }

    /// Starts the guard for this session (once), naming it in the journal.
    pub fn ensure_guard(&mut self) -> Result<(), MigrateError> {
        if self.guard.is_some() {
            return Ok(());
        }
        let (Some(g), Some(js), Some(j)) = (self.guards, self.journals.as_ref(), self.journal.as_ref()) else {
            return Ok(());
        };
        let path = js.path::<SourceJournal>(&j.session);
        let guard = g.spawn(&path).map_err(|e| {
            MigrateError::Refused(format!(
                "cannot start the guard that keeps the source's copy safe should this process die ({e}); nothing was committed"
            ))
        })?;
        let pid = guard.pid;
        self.guard = Some(guard);
        let state = self.journal.as_ref().map(|j| j.state).unwrap_or(SourceState::Frozen);
        let note = self.journal.as_ref().map(|j| j.note.clone()).unwrap_or_default();
        self.record(state, &note, |j| j.guard_pid = Some(pid))
    }
}

/// What phase 1 found.
pub(super) struct Prepared {
    pub session: String,
    pub dir: PathBuf,
    pub version: Version,
    htype: Option<phaul_abi::HostTypeBox>,
    pub root_pid: i32,
    pub fs_name: String,
    pub fs_roots: Vec<String>,
    pub pre_copy: bool,
}

/// The handover's plan, from the pre-copy phase.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// The final round's number.
    pub round: u32,
    pub pre_copied: bool,
    pub lazy_final: bool,
    pub order: HandoverOrder,
}

/// Stores a pre-dump round's page maps, as the destination's page server wrote them, in the source's round
/// directory, with an empty file for each page data image. A lazy final dump writes locally and looks for pages
/// an earlier round moved only in its local parent directory: without the maps it would treat every page as new
/// and post-copy would move all memory again.
fn keep_pagemaps(dir: &Path, reply: w::EndRoundReply) -> Result<(), MigrateError> {
    for f in reply.pagemaps {
        if !images::is_pagemap_image(&f.name) {
            return Err(MigrateError::BadImageName { what: "page map", name: f.name });
        }
        let path = dir.join(&f.name);
        std::fs::write(&path, f.data).map_err(|source| MigrateError::WriteImage { path, source })?;
    }
    for name in reply.page_files {
        if !images::is_pages_image(&name) {
            return Err(MigrateError::BadImageName { what: "page file", name });
        }
        let path = dir.join(&name);
        std::fs::write(&path, b"").map_err(|source| MigrateError::WriteImage { path, source })?;
    }
    Ok(())
}

/// Tells the host type how the migration ended, then takes what it says of the workload into the report.
pub(super) fn finish_htype(run: &mut SourceRun<'_>, live: &mut Live, outcome: Outcome) {
    let _ = live.htype.finish(outcome);
    match live.htype.report().into_result() {
        Ok(list) => {
            run.report.htype_details =
                list.into_iter().map(|kv| (kv.key.into_string(), kv.value.into_string())).collect()
        }
        Err(e) => log::warn!("the host type '{}' could not say what to report: {e}", run.cfg.htype),
    }
}
