//! The source side of a live migration.
//!
//! Invariant: until the destination has confirmed a restore, the workload is never killed. Every failure before
//! that point leaves it running: either CRIU was never asked to freeze it, or the failure happens inside CRIU's
//! `post-dump` notification, which phaul answers with an error so that CRIU resumes the tree.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abi_stable::std_types::RResult;
use phaul_abi::{CriuStage, Outcome, PluginError};
use phaul_proto::criu::{CriuOpts, CriuPageServerInfo, CriuReqType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{
    self as w, ChannelKind, ChannelOpen, CpuCheck, EndRound, Finish, FsRoundDone, Hello, KeyValue, Restore, Setup,
    StartRound,
};
use phaul_proto::PROTOCOL_VERSION;

use super::files::{self, FileTransferError};
use super::policy::{self, OnNoConverge, Policy, RoundSample, StopReason};
use super::report::{ChannelBytes, MemoryStrategy, Report, RoundReport};
use super::{page_size, private_dir, sanitize, Progress};
use crate::criu::{build_opts, rpc, Criu, CriuError, Features, Version, MIN_CRIU};
use crate::images::{self, ImageError};
use crate::plugins::{PluginLoadError, Registry};
use crate::transport::{self, Channel, ChannelName, TransportError};
use crate::wire::{self, WireError};
use crate::{expect_reply, sys};

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
    pub keep_images: bool,
    pub img_path: PathBuf,
    pub skip_cpu_check: bool,
    pub skip_criu_check: bool,
    pub timeout: Duration,
    pub progress: bool,
    /// A file on the destination to write the restored root pid into.
    pub dst_rpid: Option<PathBuf>,
}

/// How the source reaches the destination.
#[derive(Debug)]
pub enum SourceChannels {
    /// Connections handed in by a caller.
    Given { rpc: Channel, mem: Channel, fs: Option<Channel> },
    /// phaul connects to `phaul serve --listen ADDR` itself.
    Connect { addr: String },
}

/// Why a migration failed. In every case the report says whether the workload still runs on the source.
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
    #[error("post-copy failed after the workload had started on the destination ({0}); the destination's copy was killed and CRIU resumed the source's, so whatever the workload did on the destination meanwhile is lost")]
    PostCopyBroken(String),
    #[error("post-copy lost the workload: the source's CRIU handed over all its memory and ended the source tree, but the destination's restore failed ({0}); its images are kept on both hosts")]
    PostCopyLost(String),
    #[error("after CRIU reported a successful dump, the source tree (pid {pid}) is still alive; the destination copy was removed and the source keeps running")]
    SourceSurvived { pid: i32 },
}

impl SourceConfig {
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

fn version_text(v: &Option<w::CriuVersion>) -> String {
    v.as_ref().map(|v| v.text.clone()).unwrap_or_else(|| "unknown".into())
}

/// Runs one migration. Always returns a report; the error, if any, is also in the report.
pub fn migrate(
    reg: &Registry,
    criu: &Criu,
    cfg: &SourceConfig,
    channels: SourceChannels,
) -> (Report, Result<(), MigrateError>) {
    let started = Instant::now();
    let mut run = SourceRun::new(cfg);
    let result = run.run(reg, criu, channels);
    let mut report = run.report;
    report.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(()) => report.outcome = "migrated",
        Err(e) => {
            report.outcome = if run.migrated { "migrated" } else { "failed" };
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
    }
    (report, result)
}

struct SourceRun<'c> {
    cfg: &'c SourceConfig,
    report: Report,
    progress: Progress,
    migrated: bool,
    final_fs_round: u32,
    /// Post-copy: when the restore was asked for (the workload runs on the destination from about then on).
    restored_at: Option<Instant>,
    /// Post-copy: the destination's answer to the restore is still to be read.
    restore_pending: bool,
    /// This host's CRIU cpuinfo image, for the destination's CPU check.
    cpuinfo: Option<Vec<u8>>,
}

/// Everything a running migration holds.
struct Live {
    rpc: Channel,
    mem: Channel,
    fs_ch: Option<Channel>,
    htype: phaul_abi::HostTypeBox,
    fs: phaul_abi::FsSenderBox,
    fs_name: String,
    root_pid: i32,
    dir: PathBuf,
}

impl<'c> SourceRun<'c> {
    fn new(cfg: &'c SourceConfig) -> Self {
        SourceRun {
            cfg,
            progress: Progress::new(cfg.progress),
            migrated: false,
            final_fs_round: 0,
            restored_at: None,
            restore_pending: false,
            cpuinfo: None,
            report: Report {
                outcome: "failed",
                error: None,
                htype: cfg.htype.clone(),
                id: cfg.id.clone(),
                fs_driver: cfg.fs.clone().unwrap_or_default(),
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
                lazy_restore: cfg.lazy_restore,
                pages_loaded_ms: None,
                freeze_started: None,
                source_criu: String::new(),
                destination_criu: String::new(),
                rounds: Vec::new(),
                fs_rounds: 0,
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
                images_kept: cfg.keep_images,
            },
        }
    }

    fn run(&mut self, reg: &Registry, criu: &Criu, channels: SourceChannels) -> Result<(), MigrateError> {
        let cfg = self.cfg;
        // Everything local is checked before the destination is contacted, and long before the workload is touched.
        if cfg.lazy_restore && (cfg.pre_dump != PreDump::Off || cfg.lazy || cfg.post_copy_after.is_some()) {
            return Err(MigrateError::LazyRestoreNeedsStopAndCopy);
        }
        let session =
            sys::random_hex(6).map_err(|source| MigrateError::ImageDir { path: cfg.img_path.clone(), source })?;
        private_dir(&cfg.img_path, true)
            .map_err(|source| MigrateError::ImageDir { path: cfg.img_path.clone(), source })?;
        let dir = cfg.img_path.join(format!("{}-{}-{session}-source", sanitize(&cfg.htype), sanitize(&cfg.id)));
        private_dir(&dir, false).map_err(|source| MigrateError::ImageDir { path: dir.clone(), source })?;
        self.report.source_images = Some(dir.display().to_string());
        let cpu_dir = dir.join("cpuinfo");
        if !cfg.skip_cpu_check {
            private_dir(&cpu_dir, false).map_err(|source| MigrateError::ImageDir { path: cpu_dir.clone(), source })?;
        }
        let (version, features, cpuinfo) = criu.preflight((!cfg.skip_cpu_check).then_some(cpu_dir.as_path()))?;
        self.cpuinfo = cpuinfo;
        self.report.source_criu = version.to_string();
        if version.triple() < MIN_CRIU {
            return Err(MigrateError::CriuTooOld {
                found: version.to_string(),
                min: format!("{}.{}.{}", MIN_CRIU.0, MIN_CRIU.1, MIN_CRIU.2),
            });
        }

        let mut htype = reg.new_host_type(&cfg.htype, phaul_abi::Role::Source, &cfg.id, &cfg.htype_options, &dir)?;
        let root_pid = plugin(htype.root_pid(), "host type", &cfg.htype)?;
        self.report.source_pid = Some(root_pid);
        let fs_name = match cfg.fs.clone().or_else(|| reg.default_fs(&cfg.htype).map(str::to_string)) {
            Some(f) => f,
            None => {
                return Err(MigrateError::NoFsDriver {
                    htype: cfg.htype.clone(),
                    config: reg.config_path().to_path_buf(),
                })
            }
        };
        self.report.fs_driver = fs_name.clone();
        reg.ensure(phaul_abi::PluginKind::FsDriver, &fs_name)?;
        let pre_copy = self.decide_pre_copy(features, htype.can_pre_dump())?;
        if cfg.may_post_copy() {
            // Post-copy is decided now, before anything is frozen: do lazy pages work on this host at all?
            self.progress.phase("checking that lazy pages work here");
            super::lazy::trial(criu, &dir.join("lazy-trial"), "this host (the source)")?;
        }
        let fs_roots =
            plugin(htype.fs_roots(), "host type", &cfg.htype)?.into_iter().map(|s| s.into_string()).collect::<Vec<_>>();

        // The channels: handed in, or phaul's own TCP (all three opened now; the memory and filesystem ones say
        // which session they belong to, and the destination picks them up after the greeting).
        let (mut rpc, mem, fs_ch) = match channels {
            SourceChannels::Given { rpc, mem, fs } => (rpc, mem, fs),
            SourceChannels::Connect { addr } => {
                let rpc = transport::connect(&addr, ChannelName::Rpc, Duration::from_secs(10))?;
                let open = |name, kind: ChannelKind| -> Result<Channel, MigrateError> {
                    let mut c = transport::connect(&addr, name, Duration::from_secs(10))?;
                    wire::send(&mut c, Body::ChannelOpen(ChannelOpen { session: session.clone(), kind: kind as i32 }))?;
                    Ok(c)
                };
                let mem = open(ChannelName::Mem, ChannelKind::ChannelMemory)?;
                let fs = open(ChannelName::Fs, ChannelKind::ChannelFs)?;
                (rpc, mem, Some(fs))
            }
        };
        let _ = rpc.set_read_timeout(cfg.timeout);
        let _ = mem.set_read_timeout(cfg.timeout);
        let fs_fd = fs_ch.as_ref().map(|c| c.as_fd().as_raw_fd());
        let fs = reg.new_fs_sender(&fs_name, &cfg.fs_options, fs_fd, &fs_roots, &dir)?;

        self.progress.phase("greeting the destination");
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            phaul_version: env!("CARGO_PKG_VERSION").into(),
            criu: Some(wire_version(&version)),
            session: session.clone(),
            skip_criu_check: cfg.skip_criu_check,
        };
        let reply = expect_reply!(wire::request(&mut rpc, Body::Hello(hello))?, HelloReply)?;
        if reply.protocol_version != PROTOCOL_VERSION {
            return Err(MigrateError::Protocol { ours: PROTOCOL_VERSION, theirs: reply.protocol_version });
        }
        self.report.destination_criu = version_text(&reply.criu);

        let mut live = Live { rpc, mem, fs_ch, htype, fs, fs_name, root_pid, dir };
        let result = self.migrate_live(criu, &mut live, pre_copy, &session, &fs_roots);
        self.tally(&live);
        match &result {
            Ok(()) => {
                let _ = live.fs.finish(Outcome::Migrated);
                let _ = live.htype.finish(Outcome::Migrated);
                if !cfg.keep_images {
                    if let Err(e) = std::fs::remove_dir_all(&live.dir) {
                        log::warn!("could not remove {}: {e}", live.dir.display());
                    }
                }
            }
            Err(e) => {
                if !self.migrated {
                    // Tell the destination to drop whatever it holds; the workload stays here.
                    let _ = live.rpc.set_read_timeout(Duration::from_secs(30));
                    let _ =
                        wire::request(&mut live.rpc, Body::Finish(Finish { migrated: false, reason: e.to_string() }));
                    let _ = live.fs.finish(Outcome::RolledBack);
                    let _ = live.htype.finish(Outcome::RolledBack);
                }
            }
        }
        self.progress.done();
        result
    }

    fn tally(&mut self, live: &Live) {
        let (s, r) = live.rpc.counters();
        self.report.channels.control = s + r;
        let (ms, _) = live.mem.counters();
        self.report.channels.memory_images = ms;
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

    fn migrate_live(
        &mut self,
        criu: &Criu,
        live: &mut Live,
        pre_copy: bool,
        _session: &str,
        fs_roots: &[String],
    ) -> Result<(), MigrateError> {
        let cfg = self.cfg;
        if let Some(image) = self.cpuinfo.take() {
            self.progress.phase("checking the destination's CPU");
            expect_reply!(
                wire::request(&mut live.rpc, Body::CpuCheck(CpuCheck { cpuinfo_image: image }))?,
                CpuCheckReply
            )?;
        }
        let setup = Setup {
            htype: cfg.htype.clone(),
            id: cfg.id.clone(),
            mode: w::Mode::Live as i32,
            htype_options: kvs(&cfg.htype_options),
            fs_driver: live.fs_name.clone(),
            fs_options: kvs(&cfg.fs_options),
            fs_roots: fs_roots.to_vec(),
            keep_images: cfg.keep_images,
            has_fs_channel: live.fs_ch.is_some(),
            dst_rpid: cfg.dst_rpid.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            post_copy: cfg.may_post_copy(),
            lazy_restore: cfg.lazy_restore,
        };
        let reply = expect_reply!(wire::request(&mut live.rpc, Body::Setup(setup))?, SetupReply)?;
        self.report.destination_images = Some(reply.image_dir);
        plugin(live.fs.start(), "filesystem", &live.fs_name)?;

        // Memory rounds and filesystem rounds are numbered separately; each pre-dump round is followed by one
        // filesystem round, and stop-and-copy still syncs the filesystem once while the workload runs.
        let mut round = 0u32;
        let mut fs_round = 0u32;
        let mut lazy_final = cfg.lazy;
        if pre_copy {
            let mut history: Vec<RoundSample> = Vec::new();
            let mut last_start: Option<Instant> = None;
            loop {
                round += 1;
                let started = Instant::now();
                let interval = last_start.map(|t| started.duration_since(t).as_secs_f64());
                last_start = Some(started);
                let (stats, secs) = self.memory_round(criu, live, round)?;
                history.push(RoundSample {
                    pages_written: stats.pages_written,
                    duration_s: secs,
                    interval_s: interval.unwrap_or(secs),
                });
                let rt = policy::rates(&history, page_size());
                if let Some(r) = self.report.rounds.last_mut() {
                    if history.len() >= 2 {
                        r.dirty_rate_mib_s = Some(rt.dirty_bytes_s / (1u64 << 20) as f64);
                    }
                    r.predicted_downtime_ms = rt.predicted_downtime_ms.is_finite().then_some(rt.predicted_downtime_ms);
                }
                fs_round += 1;
                self.fs_round(live, fs_round, false)?;
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
            self.progress.phase("syncing the filesystem");
            fs_round += 1;
            self.fs_round(live, fs_round, false)?;
        }
        round += 1;
        self.final_fs_round = fs_round + 1;
        self.final_dump(criu, live, round, pre_copy, lazy_final)
    }

    fn cork_pusher(&self, live: &Live) -> Option<sys::CorkPusher> {
        live.mem.dup_fd().ok().map(sys::CorkPusher::start)
    }

    fn round_dir(&self, live: &Live, round: u32) -> Result<PathBuf, MigrateError> {
        let d = live.dir.join(round.to_string());
        private_dir(&d, false).map_err(|source| MigrateError::ImageDir { path: d.clone(), source })?;
        Ok(d)
    }

    #[allow(clippy::type_complexity)]
    fn base_opts(
        &self,
        live: &mut Live,
        dir: &Path,
        log: &str,
        stage: CriuStage,
    ) -> Result<(CriuOpts, rpc::OpenDir, Vec<(std::os::fd::OwnedFd, i32)>), MigrateError> {
        let (base, open_dir) = rpc::dir_opts(dir, log)?;
        let mut fds = Vec::new();
        let h = plugin(live.htype.criu_options(stage), "host type", &self.cfg.htype)?;
        let mut opts = build_opts(base, &h);
        opts.pid = Some(live.root_pid);
        opts.ps = Some(CriuPageServerInfo { fd: Some(rpc::MEM_FD), ..Default::default() });
        if !live.fs.persistent_inodes() {
            opts.force_irmap = Some(true);
        }
        let mem =
            live.mem.dup_fd().map_err(|source| CriuError::Io { op: "handing CRIU the memory channel", source })?;
        fds.push((mem, rpc::MEM_FD));
        Ok((opts, open_dir, fds))
    }

    /// One pre-dump round; returns CRIU's stats and the round's wall time in seconds.
    fn memory_round(
        &mut self,
        criu: &Criu,
        live: &mut Live,
        round: u32,
    ) -> Result<(images::DumpStats, f64), MigrateError> {
        self.progress.phase(&format!("round {round}: pre-dump"));
        let dir = self.round_dir(live, round)?;
        expect_reply!(
            wire::request(&mut live.rpc, Body::StartRound(StartRound { round, r#final: false, lazy: false }))?,
            StartRoundReply
        )?;
        let (mut opts, _open_dir, fds) = self.base_opts(live, &dir, "pre-dump.log", CriuStage::PreDump)?;
        opts.track_mem = Some(true);
        if round > 1 {
            opts.parent_img = Some(format!("../{}", round - 1));
        }
        let t = Instant::now();
        let mut s = criu.start(fds, Some(&dir.join("criu-stderr.log")))?;
        s.set_log(dir.join("pre-dump.log"));
        let pusher = self.cork_pusher(live);
        s.call("PRE_DUMP", rpc::req(CriuReqType::PreDump, Some(opts)), &mut |_, _| Ok(()))?;
        drop(pusher);
        drop(s);
        let want_pagemaps = self.cfg.may_post_copy();
        let ended = expect_reply!(
            wire::request(&mut live.rpc, Body::EndRound(EndRound { round, want_pagemaps }))?,
            EndRoundReply
        )?;
        if want_pagemaps {
            keep_pagemaps(&dir, ended)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let stats = images::read_dump_stats(&dir)?;
        let r = RoundReport::new(round, "pre-dump", &stats, secs * 1000.0, page_size());
        self.progress.round(round, "pre-dump", r.bytes_written, secs);
        self.report.channels.memory_pages += r.bytes_written;
        self.report.rounds.push(r);
        Ok((stats, secs))
    }

    fn fs_round(&mut self, live: &mut Live, round: u32, frozen: bool) -> Result<(), MigrateError> {
        let moved = if frozen { live.fs.final_round() } else { live.fs.next_round() };
        let moved = plugin(moved, "filesystem", &live.fs_name)?;
        let reply = expect_reply!(
            wire::request(&mut live.rpc, Body::FsRoundDone(FsRoundDone { round, r#final: frozen }))?,
            FsRoundReply
        )?;
        self.report.fs_rounds += 1;
        self.report.channels.filesystem += moved.bytes.max(reply.bytes);
        Ok(())
    }

    fn final_dump(
        &mut self,
        criu: &Criu,
        live: &mut Live,
        round: u32,
        pre_copied: bool,
        lazy: bool,
    ) -> Result<(), MigrateError> {
        self.progress.phase("final dump (the workload is frozen)");
        let dir = self.round_dir(live, round)?;
        expect_reply!(
            wire::request(&mut live.rpc, Body::StartRound(StartRound { round, r#final: true, lazy }))?,
            StartRoundReply
        )?;
        let (mut opts, _open_dir, mut fds) = self.base_opts(live, &dir, "dump.log", CriuStage::Dump)?;
        opts.notify_scripts = Some(true);
        opts.leave_running = Some(false);
        if pre_copied {
            opts.track_mem = Some(true);
            opts.parent_img = Some(format!("../{}", round - 1));
        }
        // Post-copy: CRIU keeps the pages and serves them on loopback after the post-dump notification; phaul
        // relays them over the memory channel to the destination's lazy-pages daemon.
        let lazy_port = if lazy {
            let port = super::lazy::free_port().map_err(super::lazy::LazyError::Io)?;
            opts.lazy_pages = Some(true);
            opts.ps = Some(CriuPageServerInfo {
                address: Some("127.0.0.1".into()),
                port: Some(i32::from(port)),
                ..Default::default()
            });
            fds.clear();
            Some(port)
        } else {
            None
        };
        let t = Instant::now();
        self.report.freeze_started = Some(t);
        let mut s = criu.start(fds, Some(&dir.join("criu-stderr.log")))?;
        s.set_log(dir.join("dump.log"));

        let mut failure: Option<MigrateError> = None;
        let mut frozen_work_ms = 0.0;
        let mut pusher = if lazy { None } else { Some(self.cork_pusher(live)) };
        let mut relay: Option<super::lazy::SourceRelay> = None;
        let resp = {
            let this = &mut *self;
            let live = &mut *live;
            let dir = &dir;
            let failure = &mut failure;
            let frozen_work_ms = &mut frozen_work_ms;
            let pusher = &mut pusher;
            let relay = &mut relay;
            let mut handler = |script: &str, _pid: Option<i32>| -> Result<(), String> {
                let r = match script {
                    "post-dump" => {
                        // CRIU is done with the memory channel: phaul writes on it now, uncorked.
                        drop(pusher.take());
                        if let Err(e) = sys::tcp_uncork(&live.mem) {
                            log::debug!("cannot uncork the memory channel: {e}");
                        }
                        if let Some(port) = lazy_port {
                            match live.mem.dup_fd() {
                                Ok(fd) => *relay = Some(super::lazy::SourceRelay::start(port, fd, this.cfg.timeout)),
                                Err(e) => log::warn!("cannot relay lazy pages: {e}"),
                            }
                        }
                        let t = Instant::now();
                        let r = this.while_frozen(live, dir, round, lazy);
                        *frozen_work_ms = t.elapsed().as_secs_f64() * 1000.0;
                        if r.is_err() {
                            if let Some(rl) = relay.as_ref() {
                                rl.abort();
                            }
                        }
                        r
                    }
                    "network-lock" => plugin(live.htype.net_lock(), "host type", &this.cfg.htype),
                    "network-unlock" => plugin(live.htype.net_unlock(), "host type", &this.cfg.htype),
                    _ => Ok(()),
                };
                r.map_err(|e| {
                    let m = e.to_string();
                    *failure = Some(e);
                    m
                })
            };
            s.call("DUMP", rpc::req(CriuReqType::Dump, Some(opts)), &mut handler)
        };
        drop(s);
        let dump_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Some(rl) = relay {
            if let Err(e) = rl.join() {
                log::warn!("the lazy-page relay ended with: {e}");
            }
        }
        // Post-copy: now the destination's restore has answered (or failed).
        let mut restore_failed: Option<MigrateError> = None;
        if std::mem::take(&mut self.restore_pending) {
            match wire::recv(&mut live.rpc) {
                Ok(Body::RestoreReply(r)) => {
                    if let Some(d) = self.report.downtime_ms {
                        // Until the restore had finished, the workload ran nowhere.
                        self.report.downtime_ms = Some(d + r.restore_wall_us as f64 / 1000.0);
                    }
                    self.record_restore(r);
                }
                Ok(Body::Failure(f)) => {
                    restore_failed = Some(WireError::Remote { message: f.message, criu_errors: f.criu_errors }.into());
                }
                Ok(other) => {
                    restore_failed =
                        Some(WireError::Unexpected { expected: "RestoreReply", got: wire::body_name(&other) }.into())
                }
                Err(e) => restore_failed = Some(e.into()),
            }
        }
        if let Some(e) = restore_failed {
            if resp.is_ok() {
                // CRIU served every page and killed the source tree, yet the destination has no restored tree.
                return Err(MigrateError::PostCopyLost(e.to_string()));
            }
            // The restore failed, so CRIU's lazy transfer failed too and it resumed the source's tree.
            let _ = wire::request(&mut live.rpc, Body::Finish(Finish { migrated: false, reason: e.to_string() }));
            return Err(e);
        }
        if let Err(e) = resp {
            if self.report.restored_pid.is_some() && failure.is_none() {
                // Post-copy broke after the destination had started the workload: CRIU resumed the source's copy
                // (its memory is whole), so the destination's must go.
                let _ = wire::request(
                    &mut live.rpc,
                    Body::Finish(Finish { migrated: false, reason: format!("post-copy failed: {e}") }),
                );
                return Err(MigrateError::PostCopyBroken(e.to_string()));
            }
            // CRIU resumed the tree (a failed post-dump or a failed dump both leave it running).
            return Err(match (failure, e) {
                (Some(f), CriuError::Notify { .. }) => f,
                (_, e) => MigrateError::Criu(e),
            });
        }
        self.migrated = true;
        if let Some(at) = self.restored_at {
            self.report.post_copy_ms = Some(at.elapsed().as_secs_f64() * 1000.0);
        }
        log::debug!("frozen work took {frozen_work_ms:.0} ms");
        let stats = images::read_dump_stats(&dir).ok();
        if let Some(st) = &stats {
            let r = RoundReport::new(round, "dump", st, dump_ms, page_size());
            self.report.channels.memory_pages += r.bytes_written;
            // In a lazy dump CRIU's frozen time spans the whole page transfer (and CRIU 3.17 reports nonsense for
            // it); the downtime phaul measures is the figure that matters there.
            if !lazy {
                self.report.frozen_ms = Some(st.frozen_time_us as f64 / 1000.0);
            }
            self.report.rounds.push(r);
        }
        if !lazy {
            self.report.downtime_ms = self.report.frozen_ms;
        }
        // CRIU killed the tree; make sure before telling the destination it owns the workload now.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sys::pid_alive(live.root_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if sys::pid_alive(live.root_pid) {
            self.migrated = false;
            let _ = wire::request(
                &mut live.rpc,
                Body::Finish(Finish { migrated: false, reason: "the source tree survived the dump".into() }),
            );
            return Err(MigrateError::SourceSurvived { pid: live.root_pid });
        }
        self.progress.phase("confirming");
        let reply = expect_reply!(
            wire::request(&mut live.rpc, Body::Finish(Finish { migrated: true, reason: String::new() }))?,
            FinishReply
        )?;
        if !reply.kept_images.is_empty() {
            self.report.destination_images = Some(reply.kept_images);
        }
        if reply.last_page_ms > 0 {
            if lazy {
                self.report.post_copy_ms = Some(reply.last_page_ms as f64);
            }
            if self.cfg.lazy_restore {
                self.report.pages_loaded_ms = Some(reply.last_page_ms as f64);
            }
        }
        Ok(())
    }

    /// Runs inside CRIU's post-dump notification: the tree is dumped and frozen. Whatever fails here makes CRIU
    /// resume it.
    fn while_frozen(&mut self, live: &mut Live, dir: &Path, round: u32, lazy: bool) -> Result<(), MigrateError> {
        if !lazy {
            self.progress.phase("waiting for the destination's page server");
            let end = EndRound { round, want_pagemaps: false };
            expect_reply!(wire::request(&mut live.rpc, Body::EndRound(end))?, EndRoundReply)?;
        }
        self.progress.phase("final filesystem sync");
        self.fs_round(live, self.final_fs_round, true)?;
        self.progress.phase("sending images");
        let imgs = files::image_files(dir)?;
        self.send_files(live, round, w::files::Target::Images, imgs)?;
        let extra = plugin(live.htype.extra_files(), "host type", &self.cfg.htype)?;
        if !extra.is_empty() {
            let list: Vec<(PathBuf, String)> =
                extra.iter().map(|e| (PathBuf::from(e.path.as_str()), e.name.to_string())).collect();
            let hdrs = files::headers_for(&list)?;
            self.send_files(live, round, w::files::Target::Extra, hdrs)?;
        }
        self.progress.phase("restoring on the destination");
        if lazy {
            // Post-copy: the destination's restore needs pages that the source's CRIU serves only after this
            // notification is answered, so the reply is collected once CRIU has served them all.
            wire::send(&mut live.rpc, Body::Restore(Restore { round, lazy }))?;
            self.restore_pending = true;
            self.restored_at = Some(Instant::now());
            self.report.downtime_ms = self.report.freeze_started.map(|t| t.elapsed().as_secs_f64() * 1000.0);
            self.progress.phase("post-copy: the workload starts on the destination; its pages follow on demand");
            return Ok(());
        }
        let reply = expect_reply!(wire::request(&mut live.rpc, Body::Restore(Restore { round, lazy }))?, RestoreReply)?;
        self.record_restore(reply);
        Ok(())
    }

    fn record_restore(&mut self, reply: w::RestoreReply) {
        self.report.restored_pid = Some(reply.pid);
        self.report.restore_ms = Some(reply.restore_wall_us as f64 / 1000.0);
        if let Some(s) = reply.stats {
            self.report.criu_restore_ms = Some(s.restore_time_us as f64 / 1000.0);
            self.report.restore_stats = Some(images::RestoreStats {
                pages_compared: s.pages_compared,
                pages_skipped_cow: s.pages_skipped_cow,
                pages_restored: s.pages_restored,
                forking_time_us: s.forking_time_us,
                restore_time_us: s.restore_time_us,
            });
        }
    }

    fn send_files(
        &mut self,
        live: &mut Live,
        round: u32,
        target: w::files::Target,
        list: Vec<(PathBuf, w::FileHeader)>,
    ) -> Result<(), MigrateError> {
        let headers = list.iter().map(|(_, h)| h.clone()).collect();
        wire::send(&mut live.rpc, Body::Files(w::Files { round, target: target as i32, files: headers }))?;
        files::send_files(&mut live.mem, &list)?;
        let reply = wire::recv(&mut live.rpc)?;
        match reply {
            Body::FilesReply(_) => Ok(()),
            Body::Failure(f) => Err(WireError::Remote { message: f.message, criu_errors: f.criu_errors }.into()),
            other => Err(WireError::Unexpected { expected: "FilesReply", got: wire::body_name(&other) }.into()),
        }
    }
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
