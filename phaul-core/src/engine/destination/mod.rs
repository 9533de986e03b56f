//! The destination side (`phaul serve`): one session as a state machine.
//!
//! ```text
//! Greeted --Setup--> Ready --StartRound--> PageServer --EndRound--> Ready --Files/FsRoundDone--> Ready
//!   Ready --Restore--> Restoring --(CRIU's post-restore)--> Held --Commit--> Resuming --> Committed --Finish--> end
//!   any state before Committed --Finish{false} / control lost / page server or CRIU died / hold too long--> Aborted
//! ```
//!
//! Invariant: a restored tree runs only after `Commit`. Until then CRIU holds it inside its post-restore
//! notification; answering that notification with failure (or this process dying, which closes CRIU's RPC socket)
//! makes CRIU kill it. A message that does not fit the state gets an error naming both, and before a copy is held
//! it ends the session. Every transition that matters is in the session's journal before it takes effect.

mod restore;
mod self_restore;

pub use self_restore::run_helper as run_notify_helper;

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abi_stable::std_types::RResult;
use phaul_abi::{CriuStage, FsReceiverBox, HostTypeBox, Outcome, PluginError};
use phaul_proto::criu::{CriuPageServerInfo, CriuReq, CriuReqType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, Decision, Hello, HelloReply, SessionState};
use phaul_proto::PROTOCOL_VERSION;

use super::files::{self, FileTransferError};
use super::{fault, lazy, private_dir, sanitize};
use crate::criu::{build_opts, rpc, CriuBackend, CriuError, CriuSession, Version};
use crate::images;
use crate::journal::{DestinationJournal, DestinationState, Journals, ProcId};
use crate::plugins::Drivers;
use crate::transport::{Channel, ChannelName, TransportError};
use crate::wire::{self, WireError};

pub use restore::kill_restored_tree;

/// How the destination is set up.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub img_path: PathBuf,
    /// Where to write the restored root pid once the migration is committed (`--dst-rpid`).
    pub dst_rpid: Option<PathBuf>,
    /// The bound on waits for the source and for CRIU.
    pub timeout: Duration,
    /// Session journals (`--state-dir`).
    pub state_dir: PathBuf,
    /// How long a held copy waits for the source to come back after its control connection broke (phaul's own
    /// connections only: handed-in descriptors cannot come back). Never past the hold's bound.
    pub reconnect_window: Duration,
    /// TCP liveness bound on the channels (seconds).
    pub link_timeout: u32,
    /// `phaul serve --listen`: at most this many sessions at once.
    pub max_sessions: usize,
    /// Where a peer's `Setup.dst_rpid` (a bare name) is written (`--rpid-dir`); none: peers may not ask for one.
    pub rpid_dir: Option<PathBuf>,
    /// This side's own host-type options, `(host type, key, value)` (`serve --htype-opt NAME:KEY=VALUE`); they
    /// come after the source's and so win.
    pub htype_options: Vec<(String, String, String)>,
    /// This side's own filesystem-driver options (`serve --fs-opt NAME:KEY=VALUE`).
    pub fs_options: Vec<(String, String, String)>,
    /// The phaul executable whose `__notify` is CRIU's action script when a host type restores by itself (none:
    /// such host types cannot restore here).
    pub notify_helper: Option<PathBuf>,
}

/// What one served session came to.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub session: String,
    pub migrated: bool,
    pub restored_pid: Option<i32>,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the source speaks phaul protocol version {theirs}, this destination speaks {ours}; run the same phaul release on both hosts")]
    Protocol { ours: u32, theirs: u32 },
    #[error("the peer did not start with a Hello; it is not a phaul source")]
    NoHello,
    #[error("the source's {kind} connection for session {session} did not arrive within {secs} s")]
    MissingChannel { kind: &'static str, session: String, secs: u64 },
    #[error("{0}")]
    Refused(String),
    #[error("cannot query this host's CRIU: {0}")]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// Where the memory and filesystem channels come from.
pub enum DestinationChannels<'a> {
    Given {
        mem: Channel,
        fs: Option<Channel>,
    },
    /// phaul's own connections: the session's data channels and reconnections arrive through the server; `peer`
    /// is the fingerprint of the certificate that opened the session (with TLS), to which they are bound.
    Server {
        registry: &'a super::server::SessionRegistry,
        peer: Option<String>,
    },
}

impl std::fmt::Debug for DestinationChannels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DestinationChannels::Given { .. } => "Given",
            DestinationChannels::Server { .. } => "Server",
        })
    }
}

/// What the engine needs to serve sessions.
pub struct DestinationContext<'a> {
    pub drivers: &'a dyn Drivers,
    pub criu: Arc<dyn CriuBackend>,
    pub cfg: &'a DestinationConfig,
}

/// Events a session waits on.
pub(crate) enum Event {
    /// A message (or the end) of the current control connection.
    Control(Result<Body, WireError>),
    /// The round's page server exited (`Ok(status)`), or waiting on it failed.
    PageServer { round: u32, result: Result<i32, CriuError> },
    /// The restoring CRIU's pid.
    RestoreCriu(u32),
    /// The restored root exists (CRIU's setup-namespaces notification).
    RestoreRoot(i32),
    /// CRIU is letting the restored tree run (its pre-resume or post-resume notification).
    Released,
    /// The restored tree is held inside post-restore.
    Held { pid: Option<i32>, wall: Duration },
    /// CRIU's RESTORE request returned.
    RestoreDone(Result<(), CriuError>),
    /// A new control connection about this session (the source reconnected, or `phaul resolve`).
    Resolve { ch: Channel, decision: Decision },
    /// Post-copy / lazy restore: the lazy-pages daemon exited (successfully or not).
    LazyDone { ok: bool },
    /// The receiver's half of a filesystem round ended (it gives the receiver back).
    FsRound {
        round: u32,
        result: Result<(w::FsRoundReply, Option<Vec<phaul_abi::KeyValue>>), Failed>,
        fs: FsReceiverBox,
    },
}

/// The session's state.
enum State {
    Greeted,
    Ready,
    /// A page server receives round `round`.
    PageServer {
        round: u32,
        pid: ProcId,
        done: Option<Result<i32, CriuError>>,
    },
    /// CRIU restores; Held has not come yet. `abort`: the source gave up meanwhile.
    Restoring {
        deadline: Instant,
        abort: Option<String>,
    },
    /// The copy is held until `deadline` at the latest.
    Held {
        pid: ProcId,
        deadline: Instant,
    },
    /// `Commit` arrived; waiting for CRIU to let the tree run. The reply goes to `reply_to` (a reconnection) or
    /// the control channel.
    Resuming {
        pid: ProcId,
        started: Instant,
        reply_to: Option<Channel>,
    },
    Committed {
        pid: ProcId,
    },
    /// The session is over.
    Ended,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Greeted => "greeted",
            State::Ready => "set up",
            State::PageServer { .. } => "page server running",
            State::Restoring { .. } => "restoring",
            State::Held { .. } => "restored and held",
            State::Resuming { .. } => "committing",
            State::Committed { .. } => "committed",
            State::Ended => "ended",
        }
    }
}

/// A request failed: the message for the source, and CRIU's error lines if CRIU failed.
#[derive(Debug)]
pub(crate) struct Failed {
    message: String,
    criu_errors: Vec<String>,
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed { message: e.to_string(), criu_errors: Vec::new() }
    }
}

/// The outer bound on waiting for a post-copy transfer to end; what really bounds it is its progress.
const LAZY_OUTER_BOUND: Duration = Duration::from_secs(24 * 3600);

/// The feature this destination advertises in `HelloReply.features` for `FsRoundStart` and `Working`.
pub const FEATURE_FS_ROUND_START: &str = "fs-round-start";

/// How often a side that works on a filesystem round the other waits for says so (`Working`): every 2 s, or
/// four times per `timeout` when that is shorter, so that a peer bounded by the same `--timeout` hears it in time.
pub fn working_every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// What the plugins of this process reported done so far, summed: the progress `Working` carries.
pub fn plugin_progress_total() -> u64 {
    crate::plugins::services::plugin_progress().iter().fold(0u64, |a, p| a.saturating_add(p.done))
}

/// A filesystem round the receiver works on in a thread of its own (after `FsRoundStart`).
struct FsJob {
    round: u32,
    is_final: bool,
    /// The receiver's answer, once it came.
    result: Option<Result<w::FsRoundReply, Failed>>,
    /// The source's `FsRoundDone` came before the answer: reply once it comes.
    reply_pending: bool,
}

/// A name a peer sent that becomes part of a path or a lookup here (see [`super::check_name`]).
fn check_token(what: &str, name: &str) -> Result<(), Failed> {
    super::check_name(what, name).map_err(Failed::from)
}

/// Refuses a session whose images would not fit: `expected` bytes (the source's estimate, with a tenth more for
/// CRIU's metadata) against what is free for this user under `img_path`.
fn check_free_space(img_path: &Path, expected: u64) -> Result<(), Failed> {
    if expected == 0 {
        return Ok(());
    }
    let Some((free, need)) = super::preflight::room_for(img_path, expected) else { return Ok(()) };
    if free < need {
        let mib = super::report::mib;
        return Err(Failed::from(format!(
            "this destination has {} free under {} and the source will send about {} of images (its workload's resident memory, {}, and a tenth more): free space there, or start phaul serve with another --img-path",
            mib(free),
            img_path.display(),
            mib(need),
            mib(expected)
        )));
    }
    Ok(())
}

fn criu_failed(e: CriuError) -> Failed {
    Failed { criu_errors: e.criu_errors().to_vec(), message: e.to_string() }
}

fn plugin<T>(r: RResult<T, PluginError>, what: &str, name: &str) -> Result<T, Failed> {
    r.into_result().map_err(|e| Failed {
        message: format!("the destination's {what} '{name}' failed: {e}"),
        criu_errors: Vec::new(),
    })
}

/// Answers one `Resolve` on a connection handed in without data channels (`phaul serve --fdrpc FD` alone).
pub fn answer_resolution(ctx: &DestinationContext<'_>, mut rpc: Channel) -> Result<ServeSummary, ServeError> {
    let _ = rpc.set_read_timeout(ctx.cfg.timeout.min(Duration::from_secs(30)));
    match wire::recv(&mut rpc)? {
        Body::Resolve(r) => {
            let journals = Journals::open(&ctx.cfg.state_dir)?;
            super::resolve::answer_from_journal(&journals, ctx, rpc, r, &None);
            Ok(ServeSummary { session: String::new(), migrated: false, restored_pid: None, reason: "answered".into() })
        }
        Body::Preflight(p) => {
            super::preflight::answer(ctx.criu.as_ref(), ctx.drivers, &ctx.cfg.img_path, &mut rpc, p)?;
            Ok(ServeSummary { session: String::new(), migrated: false, restored_pid: None, reason: "answered".into() })
        }
        other => {
            let msg = format!(
                "with only --fdrpc, phaul serve answers `phaul resolve` and `phaul check` only, but the peer sent {}; a migration needs --fdmem too",
                wire::body_name(&other)
            );
            let _ = wire::send_failure(&mut rpc, msg.clone(), Vec::new());
            Err(ServeError::Refused(msg))
        }
    }
}

/// Serves one session on a control channel. `hello` is the greeting when it was already read.
pub fn serve_session(
    ctx: &DestinationContext<'_>,
    mut rpc: Channel,
    hello: Option<Hello>,
    channels: DestinationChannels<'_>,
) -> Result<ServeSummary, ServeError> {
    let cfg = ctx.cfg;
    let _ = rpc.set_read_timeout(cfg.timeout.min(Duration::from_secs(30)));
    let _ = rpc.set_liveness(cfg.link_timeout);
    let local = ctx.criu.version()?;
    let hello = match hello {
        Some(h) => h,
        None => match wire::recv(&mut rpc)? {
            Body::Hello(h) => h,
            Body::Resolve(r) => {
                // A resolution with handed-in descriptors: answered from the journal.
                let journals = Journals::open(&cfg.state_dir)?;
                super::resolve::answer_from_journal(&journals, ctx, rpc, r, &None);
                return Ok(ServeSummary {
                    session: String::new(),
                    migrated: false,
                    restored_pid: None,
                    reason: "answered a resolution".into(),
                });
            }
            _ => {
                let _ = wire::send_failure(&mut rpc, "the first message must be Hello".into(), Vec::new());
                return Err(ServeError::NoHello);
            }
        },
    };
    if let Err(e) = check_hello(&hello, &local) {
        let _ = wire::send_failure(&mut rpc, e.to_string(), Vec::new());
        return Err(e);
    }
    let _ = rpc.set_read_timeout(Duration::ZERO);
    fault::at("dst", "recv", "Hello");
    wire::send(
        &mut rpc,
        Body::HelloReply(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            phaul_version: env!("CARGO_PKG_VERSION").into(),
            criu: Some(w::CriuVersion {
                major: local.major,
                minor: local.minor,
                sublevel: local.sublevel,
                text: local.to_string(),
            }),
            features: vec![FEATURE_FS_ROUND_START.into()],
            timeout_ms: cfg.timeout.as_millis() as u64,
        }),
    )?;
    let (events_tx, events) = mpsc::channel();
    let (mem, fs, registry, peer) = match channels {
        DestinationChannels::Given { mem, fs } => (mem, fs, None, None),
        DestinationChannels::Server { registry: reg, peer } => {
            let wait = cfg.timeout.min(Duration::from_secs(60));
            let s = &hello.session;
            let mem = reg.take_channel(s, w::ChannelKind::ChannelMemory, wait, &peer)?.renamed(ChannelName::Mem);
            let fs = reg.take_channel(s, w::ChannelKind::ChannelFs, wait, &peer)?.renamed(ChannelName::Fs);
            reg.register(s, events_tx.clone(), peer.clone());
            (mem, Some(fs), Some(reg), peer)
        }
    };
    let _ = mem.set_liveness(cfg.link_timeout);
    let _ = mem.set_read_timeout(cfg.timeout);
    if let Some(f) = &fs {
        let _ = f.set_liveness(cfg.link_timeout);
    }
    let reader = rpc.try_clone().map_err(|source| TransportError::Setup { channel: "control", source })?;
    let tx = events_tx.clone();
    wire::spawn_reader(reader, move |m, _| tx.send(Event::Control(m)).is_ok());
    let journals = Journals::open(&cfg.state_dir)?;
    let mut s = Session {
        ctx,
        session: hello.session.clone(),
        journals,
        journal: None,
        rpc,
        rpc_alive: true,
        mem,
        fs_ch: fs,
        events,
        events_tx,
        can_reconnect: registry.is_some(),
        state: State::Greeted,
        dir: None,
        htype: None,
        htype_name: String::new(),
        fs: None,
        fs_name: String::new(),
        keep_images: false,
        dst_rpid: cfg.dst_rpid.clone(),
        lazy: None,
        lazy_restore: false,
        restart: false,
        fs_final_done: false,
        max_frozen: cfg.timeout,
        decision: None,
        restore_criu: None,
        released: false,
        prepared: Vec::new(),
        page_server: None,
        outcome: None,
        restore_round: None,
        pending_write: None,
        peer,
        fs_job: None,
        criu_version: local.triple(),
        peer_timeout: (hello.timeout_ms > 0).then(|| Duration::from_millis(hello.timeout_ms)),
        last_activity: Instant::now(),
        last_progress: None,
    };
    let r = s.run();
    if let Some(reg) = registry {
        reg.unregister(&hello.session);
    }
    // The session is over: the peer learns it from the connection's end as well (what was sent is still
    // delivered). The reader thread holds a duplicate of the descriptor, so dropping ours would not close it.
    s.rpc.shutdown();
    s.mem.shutdown();
    if let Some(f) = &s.fs_ch {
        f.shutdown();
    }
    r
}

fn check_hello(h: &Hello, local: &Version) -> Result<(), ServeError> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(ServeError::Protocol { ours: PROTOCOL_VERSION, theirs: h.protocol_version });
    }
    if let Err(e) = crate::journal::check_session(&h.session) {
        return Err(ServeError::Refused(format!("{e}; is the source running the same phaul release?")));
    }
    let Some(theirs) = h.criu.clone() else {
        return Err(ServeError::Refused("the source did not say which CRIU it runs; is it a phaul source?".into()));
    };
    if (local.major, local.minor, local.sublevel) < (theirs.major, theirs.minor, theirs.sublevel) && !h.skip_criu_check
    {
        return Err(ServeError::Refused(format!(
            "the destination's CRIU {local} is older than the source's CRIU {}; images written by a newer CRIU may not restore with an older one. Upgrade CRIU on the destination, or pass --skip-criu-check to the source if you know they are compatible",
            theirs.text
        )));
    }
    Ok(())
}

/// Post-copy or `--lazy-restore`: CRIU's lazy-pages daemon, its relay to the source (post-copy only), and when
/// the restore let the tree run.
struct Lazy {
    daemon: Option<std::process::Child>,
    relay: Option<lazy::DestinationRelay>,
    resumed_at: Option<Instant>,
    done: Option<bool>,
}

struct Session<'a> {
    ctx: &'a DestinationContext<'a>,
    session: String,
    journals: Journals,
    journal: Option<DestinationJournal>,
    rpc: Channel,
    /// Whether the control connection is still usable.
    rpc_alive: bool,
    mem: Channel,
    fs_ch: Option<Channel>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    can_reconnect: bool,
    state: State,
    dir: Option<PathBuf>,
    htype: Option<Arc<Mutex<HostTypeBox>>>,
    htype_name: String,
    fs: Option<FsReceiverBox>,
    fs_name: String,
    keep_images: bool,
    dst_rpid: Option<PathBuf>,
    lazy: Option<Lazy>,
    lazy_restore: bool,
    /// Restart mode: the host type starts the workload from its files (`Start`); nothing is restored.
    restart: bool,
    /// The final filesystem round has arrived (what restart mode's `Start` waits for).
    fs_final_done: bool,
    /// The bound on the freeze (from the source's Setup), which also bounds a held copy.
    max_frozen: Duration,
    /// The decision channel into the restore thread.
    decision: Option<Sender<bool>>,
    restore_criu: Option<u32>,
    /// CRIU said it lets the restored tree run (after the commit): from then on the tree is never discarded.
    released: bool,
    /// What the filesystem receiver prepared for the host type (after the final round).
    prepared: Vec<phaul_abi::KeyValue>,
    /// The page server's CRIU session (kept until the round ends) and its pid.
    page_server: Option<ProcId>,
    outcome: Option<ServeSummary>,
    /// The directory of the round being restored (CRIU writes its restore stats there).
    restore_round: Option<PathBuf>,
    /// A journal write under way beside CRIU's resume.
    pending_write: Option<std::thread::JoinHandle<Result<DestinationJournal, crate::journal::JournalError>>>,
    /// The certificate fingerprint of the peer that opened the session (with TLS).
    peer: Option<String>,
    /// The filesystem round the receiver works on, if any.
    fs_job: Option<FsJob>,
    /// This host's CRIU.
    criu_version: (u32, u32, u32),
    /// The source's --timeout, as its Hello said.
    peer_timeout: Option<Duration>,
    /// When the source last did something that counts (a message, or `Working` with more progress).
    last_activity: Instant,
    /// The progress of the source's last `Working`.
    last_progress: Option<u64>,
}

fn lock(h: &Mutex<HostTypeBox>) -> std::sync::MutexGuard<'_, HostTypeBox> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host type, unless another thread holds it longer than `d` (a host type restoring by itself holds it for
/// its whole restore, which may hang).
fn lock_within(h: &Mutex<HostTypeBox>, d: Duration) -> Option<std::sync::MutexGuard<'_, HostTypeBox>> {
    let deadline = Instant::now() + d;
    loop {
        match h.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

impl Session<'_> {
    fn summary(&self, migrated: bool, pid: Option<i32>, reason: impl Into<String>) -> ServeSummary {
        ServeSummary { session: self.session.clone(), migrated, restored_pid: pid, reason: reason.into() }
    }

    fn run(&mut self) -> Result<ServeSummary, ServeError> {
        loop {
            if let Some(done) = self.outcome.take() {
                return Ok(done);
            }
            if matches!(self.state, State::Ended) {
                return Ok(self.summary(false, None, "the session ended"));
            }
            let working = self.fs_job.as_ref().is_some_and(|j| j.result.is_none());
            let bound = self.wait_bound();
            let every = working_every(self.peer_timeout.map_or(self.ctx.cfg.timeout, |p| p.min(self.ctx.cfg.timeout)));
            let timeout = if working { every.min(bound) } else { bound };
            let ev = match self.events.recv_timeout(timeout) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) if working && self.wait_bound() > Duration::from_millis(1) => {
                    // The receiver works on a round the source waits for: say so, with its progress. (The source
                    // is still bounded meanwhile: its own Working must show progress.)
                    if let Some(j) = self.fs_job.as_ref() {
                        let round = j.round;
                        self.send(Body::Working(w::Working { round, progress: plugin_progress_total() }));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.on_timeout();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.abort("the session's event queue closed");
                    continue;
                }
            };
            match ev {
                Event::Control(Ok(Body::Working(w))) => {
                    // Only more progress counts: a peer that sends Working and moves nothing still times out.
                    if self.last_progress != Some(w.progress) {
                        self.last_progress = Some(w.progress);
                        self.last_activity = Instant::now();
                    }
                }
                Event::Control(Ok(body)) => {
                    self.on_message(body);
                    // The source's silence is counted from when this side finished with its message (a long
                    // Files or Setup does not use up the source's --timeout).
                    self.last_activity = Instant::now();
                }
                Event::FsRound { round, result, fs } => self.on_fs_round(round, result, fs),
                Event::Control(Err(e)) => self.on_control_lost(e),
                Event::PageServer { round, result } => self.on_page_server(round, result),
                Event::RestoreCriu(pid) => self.restore_criu = Some(pid),
                Event::RestoreRoot(pid) => self.on_restore_root(pid),
                Event::Released => self.released = true,
                Event::Held { pid, wall } => self.on_held(pid, wall),
                Event::RestoreDone(r) => self.on_restore_done(r),
                Event::Resolve { ch, decision } => self.on_resolve(ch, decision),
                Event::LazyDone { ok } => self.on_lazy_done(ok),
            }
        }
    }

    /// How long to wait for the next event before [`Session::on_timeout`].
    fn wait_bound(&self) -> Duration {
        let t = self.ctx.cfg.timeout;
        match &self.state {
            State::Restoring { deadline, .. } | State::Held { deadline, .. } => {
                deadline.saturating_duration_since(Instant::now())
            }
            State::Resuming { started, .. } => (*started + t).saturating_duration_since(Instant::now()),
            // Post-copy: the source says Finish once the last page moved, which is bounded by the transfer's
            // progress (the daemon's watcher), not by --timeout.
            State::Committed { .. } if self.lazy.as_ref().is_some_and(|l| l.done.is_none()) => LAZY_OUTER_BOUND,
            State::Ended => Duration::ZERO,
            _ if !self.rpc_alive => Duration::ZERO,
            // The source sent FsRoundDone and waits on this side's receiver (its recv_working bounds that).
            _ if self.fs_job.as_ref().is_some_and(|j| j.reply_pending) => LAZY_OUTER_BOUND,
            _ => (self.last_activity + t).saturating_duration_since(Instant::now()),
        }
        .max(Duration::from_millis(1))
    }

    fn on_timeout(&mut self) {
        match &self.state {
            State::Restoring { .. } => {
                let why = format!(
                    "the restore did not reach its hold within {} s (the source's --max-frozen bound); a restore that waits for something the frozen source holds (a file lock on shared storage) ends here",
                    self.max_frozen.as_secs()
                );
                self.abort_and_tell(&why);
            }
            State::Held { .. } => {
                let why = format!(
                    "the source did not commit the held copy within {} s (its --max-frozen bound)",
                    self.max_frozen.as_secs()
                );
                self.abort_and_tell(&why);
            }
            State::Resuming { .. } => {
                // CRIU did not let the tree run in time: it is killed, and the source told there is no copy.
                let why = "CRIU did not finish resuming the restored tree within the --timeout bound".to_string();
                self.abort_and_tell(&why);
            }
            State::Committed { .. } => {
                // The source never said Finish: the copy runs here anyway.
                self.finalize("the source did not confirm the end; the workload runs here");
            }
            _ if !self.rpc_alive => {
                self.abort("the control connection was lost");
                self.end_session(false, None, "the control connection was lost");
            }
            _ => {
                let secs = self.ctx.cfg.timeout.as_secs();
                let why = if self.fs_job.is_some() {
                    format!("the source's filesystem driver reported no progress for {secs} s (the --timeout bound; a driver that reports progress may take as long as it needs)")
                } else {
                    format!("the source sent nothing for {secs} s (the --timeout bound)")
                };
                self.abort_and_tell(&why);
            }
        }
    }

    fn reply(&mut self, r: Result<Body, Failed>) {
        let body = match r {
            Ok(b) => b,
            Err(f) => {
                log::warn!("session {}: request failed: {}", self.session, f.message);
                Body::Failure(w::Failure { message: f.message, criu_errors: f.criu_errors, aborted: false })
            }
        };
        self.send(body);
    }

    fn send(&mut self, body: Body) {
        if !self.rpc_alive {
            return;
        }
        fault::at("dst", "send", wire::body_name(&body));
        if let Err(e) = wire::send(&mut self.rpc, body) {
            log::warn!("session {}: cannot answer the source: {e}", self.session);
            self.rpc_alive = false;
        }
    }

    fn misfit(&mut self, body: &Body) -> Failed {
        Failed::from(format!(
            "the source sent {} while this destination's session is {}; that message does not fit here",
            wire::body_name(body),
            self.state.name()
        ))
    }

    fn on_message(&mut self, body: Body) {
        fault::at("dst", "recv", wire::body_name(&body));
        let state = std::mem::replace(&mut self.state, State::Ended);
        match (state, body) {
            (State::Greeted, Body::CpuCheck(c)) => {
                self.state = State::Greeted;
                let r = self.cpu_check(c.cpuinfo_image);
                self.reply(r);
            }
            (State::Greeted, Body::Setup(s)) => {
                self.state = State::Ready;
                match self.setup(s) {
                    Ok(b) => self.send(b),
                    Err(f) => {
                        // A failed Setup ends the session.
                        self.abort_with_failure(f);
                    }
                }
            }
            (State::Ready, Body::StartRound(r)) => {
                self.state = State::Ready;
                let res =
                    if r.lazy || r.pages_as_files { self.round_dir_only(r.round) } else { self.start_round(r.round) };
                match res {
                    Ok(b) => self.send(b),
                    Err(f) => self.abort_with_failure(f),
                }
            }
            (State::PageServer { round, pid, done }, Body::EndRound(e)) => {
                self.state = State::PageServer { round, pid, done };
                match self.end_round(e.round, e.want_pagemaps) {
                    Ok(b) => self.send(b),
                    Err(f) => self.abort_with_failure(f),
                }
            }
            (State::Ready, Body::FsRoundStart(r)) => {
                self.state = State::Ready;
                if let Err(f) = self.start_fs_job(r.round, r.r#final) {
                    self.abort_with_failure(f);
                }
            }
            (State::Ready, Body::FsRoundDone(r)) if self.fs_job.is_some() => {
                self.state = State::Ready;
                let Some(mut j) = self.fs_job.take() else { return };
                if j.round != r.round || j.is_final != r.r#final {
                    let f = Failed::from(format!(
                        "the source ended filesystem round {}{} while round {}{} runs here",
                        r.round,
                        if r.r#final { " (final)" } else { "" },
                        j.round,
                        if j.is_final { " (final)" } else { "" }
                    ));
                    self.fs_job = Some(j);
                    self.abort_with_failure(f);
                    return;
                }
                match j.result.take() {
                    Some(Ok(reply)) => self.send(Body::FsRoundReply(reply)),
                    Some(Err(f)) => self.abort_with_failure(f),
                    None => {
                        j.reply_pending = true;
                        self.fs_job = Some(j);
                    }
                }
            }
            (State::Ready, Body::FsRoundDone(r)) => {
                self.state = State::Ready;
                match self.fs_round(r.round, r.r#final) {
                    Ok(b) => self.send(b),
                    Err(f) => self.abort_with_failure(f),
                }
            }
            (State::Ready, Body::Files(f)) => {
                self.state = State::Ready;
                match self.files(f) {
                    Ok(b) => self.send(b),
                    Err(f) => self.abort_with_failure(f),
                }
            }
            (State::Ready, body @ (Body::Restore(_) | Body::Start(_))) if self.fs_job.is_some() => {
                self.state = State::Ready;
                let f = Failed::from(format!(
                    "the source sent {} while filesystem round {} still runs here",
                    wire::body_name(&body),
                    self.fs_job.as_ref().map(|j| j.round).unwrap_or(0)
                ));
                self.abort_with_failure(f);
            }
            (State::Ready, Body::Restore(r)) => {
                self.state = State::Ready;
                if let Err(f) = self.restore(r.round, r.lazy) {
                    self.abort_with_failure(f);
                }
            }
            (State::Restoring { deadline, .. }, Body::Finish(f)) if !f.migrated => {
                // The answer comes once CRIU reports the hold (or fails).
                self.state = State::Restoring { deadline, abort: Some(f.reason) };
            }
            (State::Ready, Body::Start(_)) if self.restart => {
                self.state = State::Ready;
                self.start_workload();
            }
            (State::Held { pid, .. }, Body::Commit(_)) => {
                self.commit(pid, None);
            }
            (State::Committed { pid }, Body::Finish(f)) if f.migrated => {
                self.state = State::Committed { pid };
                self.finalize("the source confirmed");
            }
            (State::Committed { pid }, other) => {
                self.state = State::Committed { pid };
                let f = self.misfit(&other);
                self.reply(Err(f));
            }
            (State::Resuming { pid, started, reply_to }, other) => {
                self.state = State::Resuming { pid, started, reply_to };
                let f = self.misfit(&other);
                self.reply(Err(f));
            }
            (state, Body::Finish(f)) if !f.migrated => {
                self.state = state;
                let reason = if f.reason.is_empty() { "the source gave up".to_string() } else { f.reason };
                self.abort(&reason);
                let kept = self.dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
                self.send(Body::FinishReply(w::FinishReply { kept_images: kept, last_page_ms: 0 }));
                self.end_session(false, None, reason);
            }
            (state, other) => {
                self.state = state;
                let f = self.misfit(&other);
                if matches!(self.state, State::Held { .. }) {
                    self.reply(Err(f));
                } else {
                    self.abort_with_failure(f);
                }
            }
        }
    }

    fn on_control_lost(&mut self, e: WireError) {
        if !self.rpc_alive {
            return;
        }
        self.rpc_alive = false;
        let why = format!("the control connection was lost ({e})");
        match &mut self.state {
            State::Held { deadline, .. } if self.can_reconnect => {
                // Wait for a reconnection no longer than the window (and never past the hold's own bound).
                let window = Instant::now() + self.ctx.cfg.reconnect_window;
                if window < *deadline {
                    *deadline = window;
                }
                log::warn!(
                    "session {}: {why}; holding the restored copy up to {} s for the source to come back",
                    self.session,
                    deadline.saturating_duration_since(Instant::now()).as_secs()
                );
            }
            State::Resuming { .. } | State::Restoring { .. } => {
                // The answer is coming from CRIU; then the rules of that state apply.
                log::warn!("session {}: {why}", self.session);
            }
            State::Committed { .. } => {
                self.finalize("the source's connection ended after the commit; the workload runs here")
            }
            _ => {
                self.abort(&why);
                self.end_session(false, None, why);
            }
        }
    }

    fn on_resolve(&mut self, mut ch: Channel, decision: Decision) {
        log::info!("session {}: the source asks {:?} on a new connection", self.session, decision);
        let pid = |p: &ProcId| p.pid;
        let state = std::mem::replace(&mut self.state, State::Ended);
        let (st, p, detail) = match (state, decision) {
            (State::Held { pid: h, .. }, Decision::Commit) => {
                // The reply goes out once the tree runs.
                self.commit(h, Some(ch));
                return;
            }
            (State::Held { pid: h, deadline }, Decision::Query) => {
                self.state = State::Held { pid: h, deadline };
                (SessionState::StateHeld, pid(&h), "restored and held, waiting for the decision".to_string())
            }
            (State::Committed { pid: c }, _) => {
                self.state = State::Committed { pid: c };
                (SessionState::StateCommitted, pid(&c), "the workload runs here".to_string())
            }
            (State::Resuming { pid: r, started, reply_to }, Decision::Commit) if reply_to.is_none() => {
                self.state = State::Resuming { pid: r, started, reply_to: Some(ch) };
                return;
            }
            (state @ State::Resuming { .. }, _) => {
                self.state = state;
                (SessionState::StateActive, 0, "the copy is being let run; ask again".to_string())
            }
            (State::Ended, _) => {
                let j = self.journal.clone();
                let st = match j.as_ref().map(|j| j.state) {
                    Some(DestinationState::Committed) => SessionState::StateCommitted,
                    Some(DestinationState::Lost) => SessionState::StateLost,
                    _ => SessionState::StateAborted,
                };
                (st, j.and_then(|j| j.restored).map(|p| p.pid).unwrap_or(0), "the session is over".to_string())
            }
            (state, Decision::Query) => {
                self.state = state;
                (SessionState::StateActive, 0, format!("under way ({})", self.state.name()))
            }
            (state, _) => {
                // Abort (or a commit of something not held): nothing here may run.
                self.state = state;
                self.abort("the source asked to abort on a new connection");
                self.end_session(false, None, "aborted on the source's request");
                (SessionState::StateAborted, 0, "discarded".to_string())
            }
        };
        let _ = wire::send(&mut ch, Body::ResolveReply(w::ResolveReply { state: st as i32, pid: p, detail }));
    }

    fn dir(&self) -> Result<&Path, Failed> {
        self.dir.as_deref().ok_or_else(|| Failed::from("the source sent a request before Setup"))
    }

    fn write_journal(&mut self, state: DestinationState, note: &str) -> Result<(), Failed> {
        self.join_pending_write();
        let Some(j) = self.journal.as_mut() else { return Ok(()) };
        j.state = state;
        j.note = note.to_string();
        self.journals.write(j).map_err(Failed::from)
    }

    fn cpu_check(&mut self, image: Vec<u8>) -> Result<Body, Failed> {
        private_dir(&self.ctx.cfg.img_path, true)?;
        let dir = self.ctx.cfg.img_path.join(format!("cpucheck-{}", self.session));
        private_dir(&dir, false)?;
        std::fs::write(dir.join("cpuinfo.img"), image)?;
        let r = self.ctx.criu.cpuinfo_check(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Ok(()) => Ok(Body::CpuCheckReply(w::CpuCheckReply {})),
            Err(e) => {
                let mut f = criu_failed(e);
                f.message = format!(
                    "this host's CPU lacks features the source's CPU has, so the workload may crash here ({}); pass --skip-cpu-check to the source to migrate anyway",
                    f.message
                );
                Err(f)
            }
        }
    }

    fn setup(&mut self, s: w::Setup) -> Result<Body, Failed> {
        let mode = match w::Mode::try_from(s.mode) {
            Ok(w::Mode::Live) => phaul_abi::Mode::LIVE,
            Ok(w::Mode::Restart) => phaul_abi::Mode::RESTART,
            _ => {
                return Err(Failed::from(format!(
                    "the source asked for migration mode {}, which this destination does not serve (live and restart only); is it a newer phaul?",
                    s.mode
                )))
            }
        };
        self.restart = mode == phaul_abi::Mode::RESTART;
        // Everything the peer names is checked before anything is made on this host.
        check_token("host type", &s.htype)?;
        check_token("filesystem driver", &s.fs_driver)?;
        check_token("container id", &s.id)?;
        if !s.dst_rpid.is_empty() {
            // A bare name, written under this destination's --rpid-dir: never a path the peer chose.
            let Some(dir) = self.ctx.cfg.rpid_dir.clone() else {
                return Err(Failed::from(
                    "the source asked for a restored-pid file (--dst-rpid), but this destination writes them only under its --rpid-dir, which is not set; start phaul serve with --rpid-dir DIR",
                ));
            };
            check_token("--dst-rpid", &s.dst_rpid)?;
            self.dst_rpid = Some(dir.join(&s.dst_rpid));
        }
        private_dir(&self.ctx.cfg.img_path, true)?;
        check_free_space(&self.ctx.cfg.img_path, s.expected_image_bytes)?;
        let dir = self.ctx.cfg.img_path.join(format!(
            "{}-{}-{}-destination",
            sanitize(&s.htype),
            sanitize(&s.id),
            self.session
        ));
        private_dir(&dir, false)?;
        self.dir = Some(dir.clone());
        self.keep_images = s.keep_images;
        self.lazy_restore = s.lazy_restore;
        if s.max_frozen_ms > 0 {
            self.max_frozen = Duration::from_millis(s.max_frozen_ms).min(self.ctx.cfg.timeout);
        }
        let mut j = DestinationJournal {
            session: self.session.clone(),
            state: DestinationState::Active,
            htype: s.htype.clone(),
            id: s.id.clone(),
            image_dir: dir.clone(),
            restored: None,
            criu_pid: None,
            peer: self.peer.clone(),
            restart: self.restart,
            note: "set up".into(),
            updated_unix_ms: 0,
        };
        self.journals.write(&mut j)?;
        self.journal = Some(j);
        if s.post_copy || s.lazy_restore {
            // Before the source freezes anything: do lazy pages work here at all?
            let criu = crate::criu::Criu::new(self.ctx.criu.path().to_path_buf(), self.ctx.criu.timeout());
            lazy::trial(&criu, &dir.join("lazy-trial"), "the destination")?;
        }
        // The source's options, then this destination's own for that driver (`serve --htype-opt NAME:K=V`), which
        // win: paths and pools differ between hosts.
        let local = |list: &[(String, String, String)], driver: &str| -> Vec<(String, String)> {
            list.iter().filter(|(d, _, _)| d == driver).map(|(_, k, v)| (k.clone(), v.clone())).collect()
        };
        let mut opts: Vec<(String, String)> =
            s.htype_options.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
        let own_from = opts.len();
        opts.extend(local(&self.ctx.cfg.htype_options, &s.htype));
        let htype = self.ctx.drivers.destination_host_type(&s.htype, mode, &s.id, &opts, own_from, &dir)?;
        if self.restart && !htype.can_restart() {
            return Err(Failed::from(format!(
                "the '{}' host type on this destination cannot start a workload, so it cannot take a restart-mode migration",
                s.htype
            )));
        }
        self.htype = Some(Arc::new(Mutex::new(htype)));
        self.htype_name = s.htype.clone();
        // A filesystem receiver decides where data lands and which tools run as root, so it is configured by this
        // host alone: the source's options reach it only as `peer.KEY`, for information, never under their own
        // names (a source must not pick the receiving binary or the directory it writes into).
        let mut fs_opts: Vec<(String, String)> = s
            .fs_options
            .iter()
            .map(|kv| (format!("{}{}", phaul_abi::PEER_OPTION_PREFIX, kv.key), kv.value.clone()))
            .collect();
        fs_opts.extend(local(&self.ctx.cfg.fs_options, &s.fs_driver));
        let fs_fd = self.fs_ch.as_ref().map(|c| c.as_fd().as_raw_fd());
        let mut fs = self.ctx.drivers.fs_receiver(&s.fs_driver, mode, &fs_opts, fs_fd, &s.fs_roots, &dir)?;
        self.fs_name = s.fs_driver;
        plugin(fs.start(), "filesystem driver", &self.fs_name)?;
        self.fs = Some(fs);
        Ok(Body::SetupReply(w::SetupReply { image_dir: dir.display().to_string() }))
    }

    /// Restart mode's `Start`: the point of no return on the source's side. The host type starts the workload
    /// from the files the final round delivered; the journal records the start before it happens, so a serve
    /// that dies meanwhile is settled from it.
    fn start_workload(&mut self) {
        let r = (|| -> Result<i32, Failed> {
            if !self.fs_final_done {
                return Err(Failed::from("the source sent Start before the final filesystem round"));
            }
            self.write_journal(DestinationState::CommitReceived, "Start received: starting the workload here")?;
            fault::at("dst", "step", "starting");
            let h = self.htype.clone().ok_or_else(|| Failed::from("the source sent Start before Setup"))?;
            let extra = self.dir()?.join("extra");
            let mut h = lock(&h);
            if extra.is_dir() {
                plugin(h.install_extra_files(extra.to_string_lossy().as_ref().into()), "host type", &self.htype_name)?;
            }
            plugin(h.mount_root(self.prepared.clone().into()), "host type", &self.htype_name)?;
            plugin(h.start(), "host type", &self.htype_name)
        })();
        match r {
            Ok(pid) => {
                let proc_id = ProcId::of(pid);
                if let Some(j) = self.journal.as_mut() {
                    j.restored = proc_id;
                }
                if let Err(f) = self.write_journal(DestinationState::Committed, "the workload was started here") {
                    log::error!("session {}: {}", self.session, f.message);
                }
                let pid_id = proc_id.unwrap_or(ProcId { pid, start_time: 0 });
                self.state = State::Committed { pid: pid_id };
                log::info!("session {}: restart mode: the workload was started here (pid {pid})", self.session);
                self.send(Body::StartReply(w::StartReply { pid }));
            }
            Err(f) => self.abort_with_failure(f),
        }
    }

    fn round_dir(&self, round: u32) -> Result<PathBuf, Failed> {
        Ok(self.dir()?.join(round.to_string()))
    }

    fn make_round_dir(&self, round: u32) -> Result<PathBuf, Failed> {
        let d = self.round_dir(round)?;
        private_dir(&d, false)?;
        if round > 1 && self.round_dir(round - 1)?.is_dir() {
            std::os::unix::fs::symlink(format!("../{}", round - 1), d.join("parent"))?;
        }
        Ok(d)
    }

    fn start_round(&mut self, round: u32) -> Result<Body, Failed> {
        let d = self.make_round_dir(round)?;
        let (mut opts, open_dir) = rpc::dir_opts(&d, "page-server.log").map_err(criu_failed)?;
        opts.ps = Some(CriuPageServerInfo { fd: Some(rpc::MEM_FD), ..Default::default() });
        let fds = vec![(self.mem.dup_fd()?, rpc::MEM_FD)];
        let mut s = self.ctx.criu.session(fds, Some(&d.join("criu-stderr.log"))).map_err(criu_failed)?;
        s.set_log(d.join("page-server.log"));
        let mut r = rpc::req(CriuReqType::PageServerChld, Some(opts));
        r.keep_open = Some(true);
        let resp = s.call("PAGE_SERVER_CHLD", r, &mut |_, _| Ok(())).map_err(criu_failed)?;
        let pid = resp.ps.and_then(|p| p.pid).filter(|p| *p > 0).ok_or_else(|| {
            Failed::from("CRIU started a page server but did not say its pid; is this CRIU too old for phaul?")
        })?;
        let ps = ProcId::of(pid).unwrap_or(ProcId { pid, start_time: 0 });
        fault::criu_started(pid as u32);
        self.page_server = Some(ps);
        // A thread waits for the page server to exit, so that its death (a full disk, a broken channel) is
        // noticed at once and not when the source asks.
        let tx = self.events_tx.clone();
        std::thread::spawn(move || {
            let _open_dir = open_dir;
            let mut s: Box<dyn CriuSession> = s;
            let req = CriuReq { r#type: CriuReqType::WaitPid as i32, pid: Some(pid as u32), ..Default::default() };
            let result = s.call("WAIT_PID", req, &mut |_, _| Ok(())).map(|r| r.status.unwrap_or(-1));
            fault::criu_gone(pid as u32);
            let _ = tx.send(Event::PageServer { round, result });
        });
        self.state = State::PageServer { round, pid: ps, done: None };
        Ok(Body::StartRoundReply(w::StartRoundReply {}))
    }

    /// The final round of a post-copy or sequential migration: only the directory.
    fn round_dir_only(&mut self, round: u32) -> Result<Body, Failed> {
        self.make_round_dir(round)?;
        Ok(Body::StartRoundReply(w::StartRoundReply {}))
    }

    fn page_server_failure(&self, round: u32, status: Result<i32, CriuError>) -> Failed {
        let log = self.round_dir(round).map(|d| d.join("page-server.log")).ok();
        let lines = log.as_deref().map(crate::criu::error_lines).unwrap_or_default();
        let cause = lines
            .iter()
            .find(|l| l.contains("No space left") || l.contains("ENOSPC"))
            .map(|_| format!("the destination's disk is full at {}", self.ctx.cfg.img_path.display()));
        let what = match status {
            Ok(st) => format!("exited with status {st}"),
            Err(e) => format!("could not be waited for ({e})"),
        };
        Failed {
            message: format!(
                "the destination's CRIU page server for round {round} {what}{}",
                cause.map(|c| format!(": {c}")).unwrap_or_default()
            ),
            criu_errors: lines,
        }
    }

    fn on_page_server(&mut self, round: u32, result: Result<i32, CriuError>) {
        match &mut self.state {
            State::PageServer { round: r, done, .. } if *r == round => {
                let failed = !matches!(result, Ok(0));
                if failed {
                    // Tell the source now: its CRIU would otherwise write into a connection nobody reads.
                    let f = self.page_server_failure(round, result);
                    self.page_server = None;
                    self.abort_with_failure(f);
                } else {
                    *done = Some(result);
                }
            }
            _ => log::debug!("page server of round {round} ended"),
        }
    }

    fn end_round(&mut self, round: u32, want_pagemaps: bool) -> Result<Body, Failed> {
        let deadline = Instant::now() + self.ctx.cfg.timeout.min(self.max_frozen);
        // Wait for the page server's exit, serving nothing else meanwhile (the source waits for this reply).
        loop {
            if let State::PageServer { done: Some(_), .. } = &self.state {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failed::from(format!(
                    "the destination's page server for round {round} did not finish within {} s",
                    self.max_frozen.min(self.ctx.cfg.timeout).as_secs()
                )));
            }
            match self.events.recv_timeout(left) {
                Ok(Event::PageServer { round: r, result }) if r == round => match result {
                    Ok(0) => {
                        if let State::PageServer { done, .. } = &mut self.state {
                            *done = Some(Ok(0));
                        }
                    }
                    other => return Err(self.page_server_failure(round, other)),
                },
                Ok(Event::Control(Err(e))) => {
                    return Err(Failed::from(format!("the control connection was lost ({e})")))
                }
                Ok(Event::Resolve { mut ch, .. }) => {
                    let _ = wire::send(
                        &mut ch,
                        Body::ResolveReply(w::ResolveReply {
                            state: SessionState::StateActive as i32,
                            pid: 0,
                            detail: "under way".into(),
                        }),
                    );
                }
                Ok(Event::Control(Ok(b))) => {
                    return Err(Failed::from(format!(
                        "the source sent {} while the destination waited for its page server",
                        wire::body_name(&b)
                    )))
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Failed::from("the session's event queue closed")),
            }
        }
        self.page_server = None;
        self.state = State::Ready;
        let mut reply = w::EndRoundReply { page_server_bytes: 0, pagemaps: Vec::new(), page_files: Vec::new() };
        if want_pagemaps {
            for entry in std::fs::read_dir(self.round_dir(round)?)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if images::is_pagemap_image(&name) {
                    reply.pagemaps.push(w::ImageFile { data: std::fs::read(entry.path())?, name });
                } else if images::is_pages_image(&name) {
                    reply.page_files.push(name);
                }
            }
        }
        Ok(Body::EndRoundReply(reply))
    }

    /// `FsRoundStart`: the receiver's half of the round runs in a thread of its own while this session goes on
    /// serving the source (memory rounds, images).
    fn start_fs_job(&mut self, round: u32, is_final: bool) -> Result<(), Failed> {
        if let Some(j) = &self.fs_job {
            return Err(Failed::from(format!(
                "the source started filesystem round {round} while round {} still runs here",
                j.round
            )));
        }
        let mut fs =
            self.fs.take().ok_or_else(|| Failed::from("the source started a filesystem round before Setup"))?;
        let name = self.fs_name.clone();
        let tx = self.events_tx.clone();
        if is_final {
            fault::at("dst", "step", "final-fs-round");
        }
        std::thread::spawn(move || {
            let r = plugin(fs.wait_round(&crate::plugins::fs_round_info(round, is_final)), "filesystem driver", &name)
                .and_then(|r| {
                    let prepared = if is_final {
                        Some(plugin(fs.prepared(), "filesystem driver", &name)?.into_vec())
                    } else {
                        None
                    };
                    Ok((w::FsRoundReply { bytes: r.bytes, files: r.files }, prepared))
                });
            let _ = tx.send(Event::FsRound { round, result: r, fs });
        });
        self.fs_job = Some(FsJob { round, is_final, result: None, reply_pending: false });
        self.last_progress = None;
        Ok(())
    }

    fn on_fs_round(
        &mut self,
        round: u32,
        result: Result<(w::FsRoundReply, Option<Vec<phaul_abi::KeyValue>>), Failed>,
        fs: FsReceiverBox,
    ) {
        self.fs = Some(fs);
        // The source waited on this side meanwhile: its silence so far does not count against it.
        self.last_activity = Instant::now();
        let Some(mut j) = self.fs_job.take().filter(|j| j.round == round) else {
            log::debug!("session {}: filesystem round {round} ended after its session moved on", self.session);
            return;
        };
        let result = result.map(|(reply, prepared)| {
            if let Some(p) = prepared {
                self.prepared = p;
                self.fs_final_done = true;
            }
            reply
        });
        match (result, j.reply_pending) {
            (Ok(reply), true) => self.send(Body::FsRoundReply(reply)),
            (Err(f), _) => {
                if !matches!(self.state, State::Ended) {
                    self.abort_with_failure(f);
                }
            }
            (r, false) => {
                j.result = Some(r);
                self.fs_job = Some(j);
            }
        }
    }

    fn fs_round(&mut self, round: u32, is_final: bool) -> Result<Body, Failed> {
        let name = self.fs_name.clone();
        let fs = self.fs.as_mut().ok_or_else(|| Failed::from("the source sent a request before Setup"))?;
        let r = plugin(fs.wait_round(&crate::plugins::fs_round_info(round, is_final)), "filesystem driver", &name)?;
        if is_final {
            // What the receiver prepared goes to the host type's mount_root before the restore.
            self.prepared = plugin(fs.prepared(), "filesystem driver", &name)?.into_vec();
            self.fs_final_done = true;
        }
        Ok(Body::FsRoundReply(w::FsRoundReply { bytes: r.bytes, files: r.files }))
    }

    fn files(&mut self, f: w::Files) -> Result<Body, Failed> {
        let dir = match w::files::Target::try_from(f.target) {
            Ok(w::files::Target::Images) => self.round_dir(f.round)?,
            Ok(w::files::Target::Extra) => {
                let d = self.dir()?.join("extra");
                if !d.is_dir() {
                    private_dir(&d, false)?;
                }
                d
            }
            _ => return Err("files for an unknown target".into()),
        };
        // What the source announces must fit: refused before a byte is written, with the numbers.
        let announced: u64 = f.files.iter().map(|h| h.size).fold(0u64, u64::saturating_add);
        if let Ok(st) = nix::sys::statvfs::statvfs(&dir) {
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            if announced > free {
                return Err(Failed::from(format!(
                    "the destination's disk is full: the source would send {announced} bytes of images, but {} has {free} bytes free",
                    dir.display()
                )));
            }
        }
        let n = files::receive_files(&mut self.mem, &dir, &f.files).map_err(|e: FileTransferError| {
            let full =
                matches!(&e, FileTransferError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC));
            if full {
                Failed::from(format!("the destination's disk is full ({e})"))
            } else {
                Failed::from(e)
            }
        })?;
        Ok(Body::FilesReply(w::FilesReply { bytes: n }))
    }

    fn restore(&mut self, round: u32, lazy_pages: bool) -> Result<(), Failed> {
        let d = self.round_dir(round)?;
        let self_restores = self.htype.as_ref().is_some_and(|h| lock(h).restores_itself());
        if self_restores && (lazy_pages || self.lazy_restore) {
            return Err(Failed::from(format!(
                "the '{}' host type restores the workload itself, and post-copy and lazy restore need phaul's own restore; migrate it without --post-copy and --lazy-restore",
                self.htype_name
            )));
        }
        let criu = crate::criu::Criu::new(self.ctx.criu.path().to_path_buf(), self.ctx.criu.timeout());
        if lazy_pages {
            // The daemon's page requests reach the source's CRIU through phaul's relay and the memory channel.
            let header = lazy::page_server_request_size(self.criu_version);
            let relay = lazy::DestinationRelay::start(self.mem.dup_fd()?, header)?;
            let daemon = lazy::start_daemon(&criu, &d, Some(relay.port))?;
            self.lazy = Some(Lazy { daemon: Some(daemon), relay: Some(relay), resumed_at: None, done: None });
        } else if self.lazy_restore {
            // Every page is here already: the daemon reads them from this round's images and its parents.
            let daemon = lazy::start_daemon(&criu, &d, None)?;
            self.lazy = Some(Lazy { daemon: Some(daemon), relay: None, resumed_at: None, done: None });
        }
        let extra = self.dir()?.join("extra");
        let name = self.htype_name.clone();
        let htype = self.htype.clone().ok_or_else(|| Failed::from("the source sent a request before Setup"))?;
        let (root, h) = {
            let mut ht = lock(&htype);
            if extra.is_dir() {
                plugin(ht.install_extra_files(extra.to_string_lossy().as_ref().into()), "host type", &name)?;
            }
            let root =
                plugin(ht.mount_root(abi_stable::std_types::RVec::from(self.prepared.clone())), "host type", &name)?;
            let h = plugin(crate::plugins::criu_options(&mut ht, CriuStage::RESTORE), "host type", &name)?;
            (root, h)
        };
        if self_restores {
            let helper = self.ctx.cfg.notify_helper.clone().ok_or_else(|| {
                Failed::from(format!(
                    "the '{}' host type restores the workload itself, and this phaul serve has no action-script helper to hold the restore with",
                    self.htype_name
                ))
            })?;
            if h.orphan_pts_master {
                return Err(Failed::from(format!(
                    "the '{}' host type restores the workload itself but asks for orphan-pts-master, which CRIU offers over its RPC only; the console's pty master could not reach it",
                    self.htype_name
                )));
            }
            let mut options = h;
            if let abi_stable::std_types::RSome(r) = root {
                options.root = Some(r.into_string());
            }
            let (dtx, drx) = mpsc::channel();
            self.decision = Some(dtx);
            self.restore_round = Some(d.clone());
            self_restore::spawn(self_restore::Job {
                dir: d,
                helper,
                criu_path: self.ctx.criu.path().to_path_buf(),
                options,
                htype,
                htype_name: name,
                events: self.events_tx.clone(),
                decisions: drx,
            });
            self.state = State::Restoring { deadline: Instant::now() + self.max_frozen, abort: None };
            return Ok(());
        }
        let (base, open_dir) = rpc::dir_opts(&d, "restore.log").map_err(criu_failed)?;
        let (mut opts, fds) = build_opts(base, &h).map_err(Failed::from)?;
        if lazy_pages || self.lazy_restore {
            opts.lazy_pages = Some(true);
        }
        if let abi_stable::std_types::RSome(r) = root {
            opts.root = Some(r.into_string());
        }
        opts.notify_scripts = Some(true);
        let (dtx, drx) = mpsc::channel();
        self.decision = Some(dtx);
        self.restore_round = Some(d.clone());
        restore::spawn(restore::Job {
            criu: self.ctx.criu.clone(),
            dir: d,
            opts,
            fds,
            open_dir,
            htype,
            htype_name: name,
            events: self.events_tx.clone(),
            decisions: drx,
        });
        self.state = State::Restoring { deadline: Instant::now() + self.max_frozen, abort: None };
        Ok(())
    }

    /// The restored root exists: recorded (for this session's roll-back and for a restarted serve) before the
    /// tree can go anywhere. Only to the page cache: a half-restored tree does not outlive the machine.
    fn on_restore_root(&mut self, pid: i32) {
        let Some(proc_id) = ProcId::of(pid) else { return };
        if let Some(j) = self.journal.as_mut() {
            j.restored = Some(proc_id);
            j.criu_pid = self.restore_criu;
            j.note = "restoring".into();
            if let Err(e) = self.journals.write_volatile(j) {
                log::warn!("session {}: {e}", self.session);
            }
        }
    }

    fn on_held(&mut self, pid: Option<i32>, wall: Duration) {
        let abort = match &self.state {
            State::Restoring { abort, .. } => abort.clone(),
            _ => {
                log::warn!("session {}: CRIU reported a hold in state {}", self.session, self.state.name());
                self.decide(false);
                return;
            }
        };
        let Some(pid) = pid.filter(|p| *p > 0) else {
            self.decide(false);
            self.abort_and_tell("CRIU's post-restore notification named no restored pid; the restore is discarded");
            return;
        };
        let proc_id = ProcId::of(pid).unwrap_or(ProcId { pid, start_time: 0 });
        if let Some(j) = self.journal.as_mut() {
            j.restored = Some(proc_id);
            j.criu_pid = self.restore_criu;
        }
        if let Some(r) = self.lazy.as_ref().and_then(|l| l.relay.as_ref()) {
            r.guard(Some(proc_id));
        }
        let mut deadline = Instant::now() + self.max_frozen;
        if !self.rpc_alive {
            if !self.can_reconnect {
                // The source went away during the restore and cannot come back on handed-in descriptors: nobody
                // will ever commit this copy.
                self.state = State::Held { pid: proc_id, deadline };
                self.decide(false);
                self.abort("the control connection was lost during the restore; the held copy is discarded");
                self.end_session(false, None, "the control connection was lost during the restore");
                return;
            }
            deadline = deadline.min(Instant::now() + self.ctx.cfg.reconnect_window);
        }
        self.state = State::Held { pid: proc_id, deadline };
        if let Some(reason) = abort {
            self.abort(&reason);
            let kept = self.dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
            self.send(Body::FinishReply(w::FinishReply { kept_images: kept, last_page_ms: 0 }));
            self.end_session(false, None, reason);
            return;
        }
        // The answer first, then the journal (the write overlaps the round trip): a held copy needs no record to
        // be safe (CRIU kills it if this process dies); the record lets a restarted serve name it.
        self.send(Body::RestoreReply(w::RestoreReply {
            pid,
            stats: None,
            restore_wall_us: wall.as_micros() as u64,
            held: true,
        }));
        if let Err(f) = self.write_journal(DestinationState::Held, "restored and held") {
            self.decide(false);
            self.abort_with_failure(f);
        }
    }

    fn decide(&mut self, run: bool) {
        if let Some(d) = self.decision.take() {
            let _ = d.send(run);
        }
    }

    /// Lets the held copy run. The journal records the commit while CRIU resumes the tree (an fsync on the
    /// critical path would lengthen the downtime); `Committed` goes out only after both. Should this process die
    /// in between, a restarted serve finds the journal at `held` and kills the copy: the source, which has kept
    /// its own, is then told there is none here and resumes it; never two at once.
    fn commit(&mut self, pid: ProcId, reply_to: Option<Channel>) {
        fault::at("dst", "step", "commit-received");
        // The record comes before the tree may run, so that a restarted serve that finds a live tree with a
        // journal that says `held` knows it never ran (it sits in CRIU's restorer) and may kill it. The write
        // only reaches the page cache here (it must survive this process, not the machine: the tree does not
        // survive the machine either); the disk catches up beside the resume.
        if let Some(mut j) = self.journal.clone() {
            j.state = DestinationState::CommitReceived;
            j.note = "commit received".into();
            match self.journals.write_volatile(&mut j) {
                Ok(()) => {
                    let journals = self.journals.clone();
                    self.pending_write = Some(std::thread::spawn(move || {
                        journals.sync::<DestinationJournal>(&j.session.clone()).map(|_| j)
                    }));
                }
                Err(e) => log::error!("session {}: {e}", self.session),
            }
        }
        self.decide(true);
        self.state = State::Resuming { pid, started: Instant::now(), reply_to };
    }

    /// Waits for the journal write started by [`Session::commit`].
    fn join_pending_write(&mut self) {
        if let Some(h) = self.pending_write.take() {
            match h.join() {
                Ok(Ok(j)) => self.journal = Some(j),
                Ok(Err(e)) => log::error!("session {}: {e}", self.session),
                Err(_) => log::error!("session {}: the journal write panicked", self.session),
            }
        }
    }

    /// The committed tree runs: recorded, then the source (or the reconnection that asked) is told.
    fn on_resumed(&mut self, pid: ProcId, started: Instant, reply_to: Option<Channel>) {
        if let Err(f) = self.write_journal(DestinationState::Committed, "the workload runs here") {
            log::error!("session {}: {}", self.session, f.message);
        }
        if let Some(l) = self.lazy.as_mut() {
            l.resumed_at = Some(Instant::now());
        }
        self.watch_lazy_daemon();
        let stats = self.restore_round.as_ref().and_then(|d| images::read_restore_stats(d).ok()).map(restore_stats);
        let body =
            Body::Committed(w::Committed { pid: pid.pid, resume_wall_us: started.elapsed().as_micros() as u64, stats });
        self.state = State::Committed { pid };
        match reply_to {
            Some(mut ch) => {
                let _ = wire::send(
                    &mut ch,
                    Body::ResolveReply(w::ResolveReply {
                        state: SessionState::StateCommitted as i32,
                        pid: pid.pid,
                        detail: "the workload runs here".into(),
                    }),
                );
                // Nobody else will say Finish: the source learnt the outcome on this connection.
                self.finalize("committed on a reconnection");
            }
            None => self.send(body),
        }
    }

    fn on_restore_done(&mut self, r: Result<(), CriuError>) {
        self.restore_criu = None;
        self.join_pending_write();
        let state = std::mem::replace(&mut self.state, State::Ended);
        match (state, r) {
            (State::Resuming { pid, started, reply_to }, Ok(())) => self.on_resumed(pid, started, reply_to),
            (State::Resuming { pid, started, reply_to }, Err(e)) if self.released && pid.alive() => {
                // CRIU ended after it let the tree go (in its pre-resume or post-resume step): the tree runs, so
                // after the commit it is the copy, whatever CRIU says.
                log::warn!(
                    "session {}: CRIU ended after letting the restored tree run ({e}); the tree stays",
                    self.session
                );
                self.on_resumed(pid, started, reply_to);
            }
            (State::Resuming { pid, reply_to, .. }, Err(e)) => {
                // CRIU could not let the tree run; it kills it on failure. Nothing of it may stay.
                kill_restored_tree(pid.pid);
                let f = criu_failed(e);
                let msg = format!(
                    "the restored tree could not be resumed on the destination and was discarded ({}); the source's copy is the one that counts",
                    f.message
                );
                if let Some(mut ch) = reply_to {
                    let _ = wire::send(
                        &mut ch,
                        Body::ResolveReply(w::ResolveReply {
                            state: SessionState::StateAborted as i32,
                            pid: 0,
                            detail: msg.clone(),
                        }),
                    );
                }
                self.state = State::Ended;
                self.abort_with_failure(Failed { message: msg, criu_errors: f.criu_errors });
            }
            (State::Restoring { .. }, Err(e)) => {
                // The restore failed before its hold; CRIU killed what it had made.
                self.state = State::Ended;
                let f = criu_failed(e);
                self.abort_with_failure(f);
            }
            (State::Held { pid, .. }, Err(e)) => {
                // CRIU died holding the tree: the tree is stuck in CRIU's restorer and must go.
                kill_restored_tree(pid.pid);
                self.state = State::Ended;
                let f = criu_failed(e);
                self.abort_with_failure(Failed {
                    message: format!("the destination's CRIU ended while it held the restored copy ({})", f.message),
                    criu_errors: f.criu_errors,
                });
            }
            (state, r) => {
                // An abort already answered CRIU; make sure nothing is left.
                if let Some(p) = self.journal.as_ref().and_then(|j| j.restored) {
                    if !matches!(state, State::Committed { .. }) && p.alive() {
                        kill_restored_tree(p.pid);
                    }
                }
                log::debug!("session {}: the restore ended ({:?}) in state {}", self.session, r.err(), state.name());
                self.state = state;
            }
        }
    }

    fn watch_lazy_daemon(&mut self) {
        let Some(l) = self.lazy.as_mut() else { return };
        let Some(mut daemon) = l.daemon.take() else { return };
        let tx = self.events_tx.clone();
        let timeout = self.ctx.cfg.timeout;
        // Post-copy takes as long as its pages take: the daemon is bounded by their progress through the relay
        // (nothing moved for --timeout: stuck). Reading its own images (--lazy-restore), by --timeout in all.
        let moved = l.relay.as_ref().map(|r| r.moved.clone());
        std::thread::spawn(move || {
            let ok = match moved {
                Some(m) => {
                    let exited = std::cell::Cell::new(None);
                    let moving = lazy::wait_progress(&m, timeout, || match daemon.try_wait() {
                        Ok(Some(st)) => {
                            exited.set(Some(st.success()));
                            true
                        }
                        Ok(None) => false,
                        Err(_) => {
                            exited.set(Some(false));
                            true
                        }
                    });
                    if !moving {
                        log::warn!(
                            "post-copy: no page moved for {} s; ending the lazy-pages daemon",
                            timeout.as_secs()
                        );
                        let _ = daemon.kill();
                        let _ = daemon.wait();
                    }
                    moving && exited.get().unwrap_or(false)
                }
                None => lazy::wait_child(&mut daemon, timeout),
            };
            let _ = tx.send(Event::LazyDone { ok });
        });
    }

    fn on_lazy_done(&mut self, ok: bool) {
        if let Some(l) = self.lazy.as_mut() {
            l.done = Some(ok);
        }
        if !ok {
            if let State::Committed { pid } = &self.state {
                let pid = *pid;
                // The workload ran here, but its memory cannot be completed: it is lost.
                kill_restored_tree(pid.pid);
                let _ = self.write_journal(DestinationState::Lost, "post-copy could not complete the memory");
                let msg = "the lazy-pages daemon failed after the workload had started on the destination: the workload is lost (its memory was on both hosts); the destination's copy was killed".to_string();
                self.send(Body::Failure(w::Failure { message: msg.clone(), criu_errors: Vec::new(), aborted: true }));
                self.drivers_finish(Outcome::ROLLED_BACK);
                self.end_session(false, None, msg);
            }
        }
    }

    /// The workload runs here: wait for the last page (lazy modes), tell the drivers, write the pid file, remove
    /// the images unless kept, answer Finish if the source is there.
    fn finalize(&mut self, why: &str) {
        let pid = match &self.state {
            State::Committed { pid } => *pid,
            _ => return,
        };
        let mut last_page_ms = 0;
        if let Some(l) = self.lazy.as_ref() {
            let resumed = l.resumed_at;
            if l.done.is_none() {
                // Wait for the daemon (bounded by its own watcher).
                loop {
                    match self.events.recv_timeout(LAZY_OUTER_BOUND) {
                        Ok(Event::LazyDone { ok }) => {
                            self.on_lazy_done(ok);
                            break;
                        }
                        Ok(Event::Resolve { mut ch, .. }) => {
                            let _ = wire::send(
                                &mut ch,
                                Body::ResolveReply(w::ResolveReply {
                                    state: SessionState::StateCommitted as i32,
                                    pid: pid.pid,
                                    detail: "the workload runs here".into(),
                                }),
                            );
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                if matches!(self.state, State::Ended) {
                    return;
                }
            }
            if let Some(r) = self.lazy.as_ref().and_then(|l| l.relay.as_ref()) {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !r.finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            last_page_ms = resumed.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
        }
        self.drivers_finish(Outcome::MIGRATED);
        if let Some(path) = self.dst_rpid.clone() {
            if let Err(e) = write_pid_file(&path, pid.pid) {
                log::warn!("could not write the restored pid to {}: {e}", path.display());
            }
        }
        let kept = match (&self.dir, self.keep_images) {
            (Some(d), true) => d.display().to_string(),
            _ => String::new(),
        };
        self.send(Body::FinishReply(w::FinishReply { kept_images: kept, last_page_ms }));
        if let (false, Some(d)) = (self.keep_images, &self.dir) {
            if let Err(e) = std::fs::remove_dir_all(d) {
                log::warn!("could not remove {}: {e}", d.display());
            }
        }
        log::info!("session {}: migrated ({why}); restored pid {}", self.session, pid.pid);
        self.end_session(true, Some(pid.pid), why);
    }

    fn drivers_finish(&mut self, outcome: Outcome) {
        if self.fs.is_none() && self.fs_job.is_some() {
            // The receiver is busy with a round in its thread: give it back its chance to hear the end (bounded;
            // shutting its data channel down makes a streaming receiver return).
            if let Some(f) = &self.fs_ch {
                f.shutdown();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.fs.is_none() && Instant::now() < deadline {
                match self.events.recv_timeout(Duration::from_millis(20)) {
                    Ok(Event::FsRound { fs, .. }) => self.fs = Some(fs),
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if self.fs.is_none() {
                log::warn!(
                    "the destination's filesystem driver '{}' did not return from its round within 10 s; it is not told how the session ended",
                    self.fs_name
                );
            }
            self.fs_job = None;
        }
        if let Some(h) = self.htype.as_ref() {
            let Some(mut h) = lock_within(h, Duration::from_secs(10)) else {
                log::warn!(
                    "the destination's host type '{}' is busy (a restore of its own); not told how the session ended",
                    self.htype_name
                );
                return self.fs_finish(outcome);
            };
            if let Err(e) = h.finish(outcome).into_result() {
                log::warn!("the destination's host type '{}' failed to finish: {e}", self.htype_name);
            }
        }
        self.fs_finish(outcome);
    }

    fn fs_finish(&mut self, outcome: Outcome) {
        if let Some(f) = self.fs.as_mut() {
            if let Err(e) = f.finish(outcome).into_result() {
                log::warn!("the destination's filesystem driver '{}' failed to finish: {e}", self.fs_name);
            }
        }
    }

    fn end_session(&mut self, migrated: bool, pid: Option<i32>, reason: impl Into<String>) {
        self.state = State::Ended;
        self.outcome = Some(self.summary(migrated, pid, reason));
    }

    /// Aborts and tells the source (unasked) that the session is over here.
    fn abort_and_tell(&mut self, why: &str) {
        self.abort_with_failure(Failed { message: why.to_string(), criu_errors: Vec::new() });
    }

    fn abort_with_failure(&mut self, f: Failed) {
        log::warn!("session {}: {}", self.session, f.message);
        self.abort(&f.message);
        self.send(Body::Failure(w::Failure { message: f.message.clone(), criu_errors: f.criu_errors, aborted: true }));
        self.end_session(false, None, f.message);
    }

    /// Undoes everything: a held or restored tree is killed (waiting for every pid), the page server and the
    /// lazy-pages daemon stopped, the drivers told; the images stay for inspection.
    fn abort(&mut self, reason: &str) {
        log::warn!("rolling back session {}: {reason}", self.session);
        // A held copy: CRIU kills it when told; then make sure.
        self.decide(false);
        if let Some(criu) = self.restore_criu.take() {
            // A restore still under way (it may wait forever, on a lock the frozen source holds): give CRIU a
            // moment to end by itself, then end it and whatever it has restored so far.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut done = false;
            while Instant::now() < deadline && !done {
                match self.events.recv_timeout(Duration::from_millis(20)) {
                    Ok(Event::RestoreDone(_)) => done = true,
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if !done {
                restore::kill_criu_tree(criu);
            }
        }
        // CRIU is done by now (it returned, or it was ended above) and kills what it restored when it fails; a
        // tree still there outlived it (CRIU died, or its half-restored child survived it) and goes now.
        let restored = self.journal.as_ref().and_then(|j| j.restored);
        if let Some(p) = restored {
            let deadline = Instant::now() + Duration::from_millis(200);
            while p.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if p.alive() {
                // The host type ends it the way its manager ends such a workload, if it knows how (revision 3;
                // an older plugin answers no); phaul kills what is left by pid.
                if let Some(mut h) = self.htype.as_ref().and_then(|h| lock_within(h, Duration::from_secs(5))) {
                    match h.discard(p.pid).into_result() {
                        Ok(true) => log::info!("the host type '{}' discarded tree {}", self.htype_name, p.pid),
                        Ok(false) => {}
                        Err(e) => {
                            log::warn!("the host type '{}' could not discard tree {}: {e}", self.htype_name, p.pid)
                        }
                    }
                }
                if p.alive() {
                    kill_restored_tree(p.pid);
                }
            }
        }
        if let Some(ps) = self.page_server.take() {
            // The page server may sit waiting for pages that will never come: it goes, and with it the deleted
            // image files it holds open.
            self.mem.shutdown();
            if ps.alive() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(ps.pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Some(mut l) = self.lazy.take() {
            if let Some(mut d) = l.daemon.take() {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        if !matches!(self.journal.as_ref().map(|j| j.state), Some(DestinationState::Lost)) {
            let _ = self.write_journal(DestinationState::Aborted, reason);
        }
        self.drivers_finish(Outcome::ROLLED_BACK);
        self.state = State::Ended;
    }
}

/// Writes a pid file without following a symbolic link planted at its name (written beside, then renamed over).
fn write_pid_file(path: &Path, pid: i32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(format!("{pid}\n").as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn restore_stats(s: images::RestoreStats) -> w::RestoreStats {
    w::RestoreStats {
        pages_compared: s.pages_compared,
        pages_skipped_cow: s.pages_skipped_cow,
        pages_restored: s.pages_restored,
        forking_time_us: s.forking_time_us,
        restore_time_us: s.restore_time_us,
    }
}
