//! The ways a migration ends, one type each, and the commit they share.
//!
//! * [`StopAndCopy`] and [`LazyRestore`] (overlap order): the final dump streams the pages to the destination's
//!   page server; inside CRIU's post-dump notification phaul holds the tree frozen by its own freezer, the
//!   destination restores and holds its copy unrun, the source commits, the destination lets its copy run, and
//!   only then does CRIU kill the source's tree. `LazyRestore` differs on the destination (the restore loads pages
//!   on demand from its own images).
//! * [`PostCopy`] and [`Hybrid`]: the final dump keeps the pages in the frozen tree; the source commits and
//!   answers post-dump, CRIU serves the pages as the destination faults them in, then kills the tree.
//! * [`Sequential`] (shared storage with locks, sockets or FIFOs): the source's copy is its complete image set;
//!   its tree ends before the destination restores; a failure before the commit restores it on the source from
//!   that set.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_abi::{CriuStage, Outcome};
use phaul_proto::criu::{CriuPageServerInfo, CriuReqType, CriuResp};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, EndRound, Restore, SessionState, StartRound};

use super::{finish_htype, plugin, Ended, HandoverOrder, Live, MigrateError, Plan, SourceConfig, SourceRun};
use crate::criu::{rpc, CriuError};
use crate::engine::control::{AutoCommit, Deadline};
use crate::engine::files;
use crate::engine::report::RoundReport;
use crate::engine::{fault, lazy, page_size, Phase};
use crate::expect_reply;
use crate::hold::{CriuAfter, HoldRecord};
use crate::images;
use crate::journal::{ProcId, SourceState};
use crate::wire::{self, WireError};

/// One way of ending a migration.
pub(crate) trait Ending {
    fn name(&self) -> &'static str;
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError>;
}

/// Stop-and-copy: restore beside the frozen source, commit, then the source's tree ends.
pub struct StopAndCopy;
/// Stop-and-copy whose restore loads memory on demand from the destination's own copy.
pub struct LazyRestore;
/// Post-copy: the destination runs the workload before its memory is all there.
pub struct PostCopy;
/// Pre-copy rounds, then post-copy for what is left.
pub struct Hybrid;
/// The source's copy is its image set; its tree ends before the destination restores.
pub struct Sequential;

pub(super) fn ending_name(cfg: &SourceConfig, lazy_final: bool) -> &'static str {
    match (lazy_final || cfg.lazy, cfg.lazy_restore) {
        (true, _) if cfg.lazy => "post-copy",
        (true, _) => "hybrid",
        (false, true) => "lazy-restore",
        (false, false) => "stop-and-copy",
    }
}

pub(super) fn ending_for(cfg: &SourceConfig, plan: &Plan) -> Box<dyn Ending> {
    if plan.order == HandoverOrder::Sequential {
        return Box::new(Sequential);
    }
    match ending_name(cfg, plan.lazy_final) {
        "post-copy" => Box::new(PostCopy),
        "hybrid" => Box::new(Hybrid),
        "lazy-restore" => Box::new(LazyRestore),
        _ => Box::new(StopAndCopy),
    }
}

impl Ending for StopAndCopy {
    fn name(&self) -> &'static str {
        "stop-and-copy"
    }
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        overlap(run, live, plan)
    }
}

impl Ending for LazyRestore {
    fn name(&self) -> &'static str {
        "lazy-restore"
    }
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        overlap(run, live, plan)
    }
}

impl Ending for PostCopy {
    fn name(&self) -> &'static str {
        "post-copy"
    }
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        post_copy(run, live, plan)
    }
}

impl Ending for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        post_copy(run, live, plan)
    }
}

impl Ending for Sequential {
    fn name(&self) -> &'static str {
        "sequential"
    }
    fn run(&mut self, run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
        sequential(run, live, plan)
    }
}

/// What the handover decided inside (or after) the post-dump notification.
pub(super) enum Decision {
    /// Nothing was committed: the source's copy is the one that counts.
    NotCommitted(MigrateError),
    /// The destination confirmed its copy runs.
    Committed,
    /// Post-copy: `Commit` went out and post-dump was answered; the destination's answer is still to come.
    CommitSent,
    /// After the point of no return, the destination said it holds no copy.
    Aborted(MigrateError),
    /// The outcome could not be learnt.
    InDoubt(String),
    /// Post-copy: the destination ran the workload and lost it.
    Lost(String),
}

/// Everything the post-dump notification set up.
struct Frozen {
    dir: PathBuf,
    criu_pid: u32,
    hold: Option<HoldRecord>,
    decision: Option<Decision>,
}

/// Shuts the memory channel if the dump has not reached its post-dump notification by the freeze deadline, so
/// that CRIU fails (and resumes the tree) instead of waiting on a dead page server or link.
struct FreezeWatchdog {
    disarmed: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
}

impl FreezeWatchdog {
    fn start(deadline: Deadline, mem: Option<crate::transport::Channel>) -> FreezeWatchdog {
        let disarmed = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (disarmed.clone(), fired.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                if deadline.passed() {
                    f.store(true, Ordering::SeqCst);
                    if let Some(m) = &mem {
                        m.shutdown();
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        FreezeWatchdog { disarmed, fired }
    }
    fn disarm(&self) {
        self.disarmed.store(true, Ordering::SeqCst);
    }
    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for FreezeWatchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The frozen part of a handover ran past `--max-frozen`?
fn check_freeze(run: &SourceRun<'_>, step: &str) -> Result<(), MigrateError> {
    match &run.freeze {
        Some((_, d)) if d.passed() => Err(MigrateError::FreezeBound { secs: d.secs, step: step.to_string() }),
        _ => Ok(()),
    }
}

/// A wait inside the freeze turned into the error that names the bound.
fn frozen_wait(run: &SourceRun<'_>, e: WireError, step: &str) -> MigrateError {
    match e {
        WireError::NoAnswer { bound: "--max-frozen", secs, .. } => {
            MigrateError::FreezeBound { secs, step: step.into() }
        }
        WireError::Remote { message, criu_errors } if run.freeze.is_some() => {
            MigrateError::DestinationAborted { message, criu_errors }
        }
        e => MigrateError::Wire(e),
    }
}

fn start_freeze(run: &mut SourceRun<'_>) {
    let t = Instant::now();
    run.freeze = Some((t, Deadline::after(run.cfg.max_frozen, "--max-frozen")));
    run.report.freeze_started = Some(t);
}

fn freeze_ms(run: &SourceRun<'_>) -> Option<f64> {
    run.freeze.map(|(t, _)| t.elapsed().as_secs_f64() * 1000.0)
}

/// Starts the final round on the destination.
fn start_final_round(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    round: u32,
    lazy: bool,
    local: bool,
) -> Result<(), MigrateError> {
    let start = StartRound { round, r#final: true, lazy, pages_as_files: local };
    expect_reply!(live.control.request(Body::StartRound(start), run.wait())?, StartRoundReply)?;
    Ok(())
}

/// Inside post-dump: the guard, the hold, the journal. Fails if CRIU let go of the tree before phaul held it (it
/// may then have run after its dump, and the images would be stale).
///
/// One journal write, after the hold: should this process die between the two, the guard (or `phaul resolve`)
/// finds the freezer by its name (see [`crate::hold::hold_name`]) and thaws it.
fn engage(run: &mut SourceRun<'_>, live: &mut Live, fz: &mut Frozen) -> Result<(), MigrateError> {
    // Every ending starts the guard before the freeze; should one not have, it starts now, late but not never.
    run.ensure_guard()?;
    let dir = fz.dir.clone();
    let name = crate::hold::hold_name(&live.session);
    let rec = run.keeper.engage(&name, live.root_pid)?;
    fz.hold = Some(rec.clone());
    run.record(SourceState::Frozen, "held frozen by phaul's freezer inside CRIU's post-dump notification", |j| {
        j.final_round = Some(dir);
        j.hold = Some(rec);
    })?;
    if !crate::sys::pid_alive(fz.criu_pid as i32) {
        return Err(MigrateError::Refused(
            "CRIU ended before phaul held the frozen tree, so the tree may have run after its dump; the migration is abandoned"
                .into(),
        ));
    }
    Ok(())
}

/// The frozen part both overlap endings share: the last page-server round, the last filesystem round, the
/// images and the host type's files, then the restore (held on the destination).
fn transfer_and_restore(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    round: u32,
    dir: &Path,
    page_server: bool,
    lazy: bool,
) -> Result<(), MigrateError> {
    transfer(run, live, round, dir, page_server)?;
    run.progress.phase(Phase::Restore, "restoring on the destination (held until the commit)");
    let reply = live
        .control
        .request(Body::Restore(Restore { round, lazy }), run.wait())
        .map_err(|e| frozen_wait(run, e, "the destination restored"))?;
    let reply = match reply {
        Body::RestoreReply(r) if r.held => r,
        Body::RestoreReply(_) => {
            return Err(MigrateError::Refused(
                "the destination restored without holding its copy; is it an older phaul?".into(),
            ))
        }
        other => return Err(WireError::Unexpected { expected: "RestoreReply", got: wire::body_name(&other) }.into()),
    };
    record_restore(run, reply.pid, reply.stats, reply.restore_wall_us);
    check_freeze(run, "the destination restored")?;
    Ok(())
}

/// The last page-server round, the last filesystem round, the images and the host type's files.
fn transfer(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    round: u32,
    dir: &Path,
    page_server: bool,
) -> Result<(), MigrateError> {
    if page_server {
        run.progress.phase(Phase::Setup, "waiting for the destination's page server");
        let end = EndRound { round, want_pagemaps: false };
        live.control
            .request(Body::EndRound(end), run.wait())
            .map_err(|e| frozen_wait(run, e, "the destination's page server finished the final round"))
            .and_then(|b| expect_reply!(b, EndRoundReply).map_err(MigrateError::from))?;
    }
    run.progress.phase(Phase::FsFinal, "final filesystem sync");
    let fs_round = run.final_fs_round();
    run.fs_round(live, fs_round, true).map_err(|e| widen(run, e, "the final filesystem round ran"))?;
    check_freeze(run, "the final filesystem round ran")?;
    run.progress.phase(Phase::Images, "sending images");
    let imgs = files::image_files(dir)?;
    run.send_files(live, round, w::files::Target::Images, imgs).map_err(|e| widen(run, e, "the images were sent"))?;
    run.send_extra_files(live, round)?;
    check_freeze(run, "the images were sent")?;
    Ok(())
}

/// A wait that ran out inside the freeze names the bound.
fn widen(run: &SourceRun<'_>, e: MigrateError, step: &str) -> MigrateError {
    match e {
        MigrateError::Wire(w) => frozen_wait(run, w, step),
        e => e,
    }
}

fn record_restore(run: &mut SourceRun<'_>, pid: i32, stats: Option<w::RestoreStats>, wall_us: u64) {
    if pid > 0 {
        run.report.restored_pid = Some(pid);
    }
    run.report.restore_ms = Some(wall_us as f64 / 1000.0);
    if let Some(s) = stats {
        run.report.criu_restore_ms = Some(s.restore_time_us as f64 / 1000.0);
        run.report.restore_stats = Some(images::RestoreStats {
            pages_compared: s.pages_compared,
            pages_skipped_cow: s.pages_skipped_cow,
            pages_restored: s.pages_restored,
            forking_time_us: s.forking_time_us,
            restore_time_us: s.restore_time_us,
        });
    }
}

/// Records the decision to commit (the point of no return) and sends `Commit`.
fn send_commit(run: &mut SourceRun<'_>, live: &mut Live) -> Result<Instant, Decision> {
    if live.control.gone() {
        // The connection ended before the decision: Commit could not reach the destination on it, and without a
        // commit the destination discards what it holds. Rolling back now is safe, and spares a session in doubt.
        return Err(Decision::NotCommitted(MigrateError::Wire(WireError::Closed { channel: "control" })));
    }
    run.progress.phase(Phase::Commit, "committing");
    run.record(SourceState::Committing, "Commit decided: the point of no return", |_| {})
        .map_err(Decision::NotCommitted)?;
    fault::at("src", "step", "committing");
    let at = freeze_ms(run);
    if let Some(h) = run.report.handover.as_mut() {
        h.committed = true;
        h.commit_sent_ms = at;
    }
    let t = Instant::now();
    if let Err(e) = live.control.send(Body::Commit(w::Commit {})) {
        log::warn!("sending Commit failed: {e}");
    }
    Ok(t)
}

/// Waits for the answer to `Commit` (bounded by `--resolve-timeout`), reconnecting by session when it does not
/// come.
fn await_committed(run: &mut SourceRun<'_>, live: &mut Live, sent: Instant) -> Decision {
    let d = Deadline::after(run.cfg.resolve_timeout.min(run.cfg.timeout), "--resolve-timeout");
    match live.control.recv(d, "Commit") {
        Ok(Body::Committed(c)) => {
            committed(run, live, c, sent);
            Decision::Committed
        }
        Ok(Body::Failure(f)) => {
            // The destination answers Commit with a failure only once it has discarded its copy.
            if let Some(h) = run.report.handover.as_mut() {
                h.destination_aborted = Some(f.message.clone());
            }
            Decision::Aborted(MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors })
        }
        Ok(other) => {
            resolve_again(run, live, format!("the destination answered Commit with {}", wire::body_name(&other)))
        }
        Err(e) => resolve_again(run, live, format!("no answer to Commit ({e})")),
    }
}

fn committed(run: &mut SourceRun<'_>, live: &Live, c: w::Committed, sent: Instant) {
    let arrived = live.control.last_arrival.unwrap_or_else(Instant::now);
    if let Some(h) = run.report.handover.as_mut() {
        h.commit_rtt_ms = Some(arrived.saturating_duration_since(sent).as_secs_f64() * 1000.0);
    }
    if c.pid > 0 {
        run.report.restored_pid = Some(c.pid);
    }
    if let Some((t, _)) = run.freeze {
        // The workload ran nowhere from the freeze until the destination let its copy run.
        run.report.downtime_ms = Some(arrived.saturating_duration_since(t).as_secs_f64() * 1000.0);
    }
    if let Some(s) = c.stats {
        // CRIU writes its restore stats once the tree runs: these are the whole restore's.
        run.report.criu_restore_ms = Some(s.restore_time_us as f64 / 1000.0);
        run.report.restore_stats = Some(images::RestoreStats {
            pages_compared: s.pages_compared,
            pages_skipped_cow: s.pages_skipped_cow,
            pages_restored: s.pages_restored,
            forking_time_us: s.forking_time_us,
            restore_time_us: s.restore_time_us,
        });
    }
}

/// After the point of no return, without an answer: asks the destination again on new connections, for
/// `--resolve-timeout`. With handed-in descriptors phaul cannot reconnect by itself: it says so as an event.
pub(super) fn resolve_again(run: &mut SourceRun<'_>, live: &mut Live, why: String) -> Decision {
    log::warn!("{why}; trying to learn the outcome for up to {} s", run.cfg.resolve_timeout.as_secs());
    let Some((addr, dialer)) = live.to.clone() else {
        eprintln!(
            "phaul: event: {}",
            serde_json::json!({
                "event": "need-reconnect",
                "session": live.session,
                "why": why,
                "what": "the outcome of the commit is unknown; give `phaul resolve SESSION` new connections to the destination",
            })
        );
        return Decision::InDoubt(why);
    };
    let deadline = Instant::now() + run.cfg.resolve_timeout;
    let mut last = why.clone();
    while Instant::now() < deadline {
        match super::super::resolve::ask(&dialer, &addr, &live.session, w::Decision::Commit, Duration::from_secs(5)) {
            Ok(r) => match SessionState::try_from(r.state).unwrap_or(SessionState::StateUnknown) {
                SessionState::StateCommitted => {
                    if r.pid > 0 {
                        run.report.restored_pid = Some(r.pid);
                    }
                    return Decision::Committed;
                }
                SessionState::StateAborted | SessionState::StateUnknown => {
                    return Decision::Aborted(MigrateError::DestinationAborted {
                        message: format!(
                            "after the commit was lost, the destination says it holds no copy ({})",
                            r.detail
                        ),
                        criu_errors: Vec::new(),
                    })
                }
                SessionState::StateLost => return Decision::Lost(r.detail),
                SessionState::StateHeld | SessionState::StateActive => last = r.detail,
            },
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Decision::InDoubt(format!(
        "{why}; the destination could not be asked again within {} s ({last})",
        run.cfg.resolve_timeout.as_secs()
    ))
}

/// The overlap order: stop-and-copy or lazy-restore.
fn overlap(run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
    run.progress.phase(Phase::FinalDump, "final dump (the workload is frozen)");
    let round = plan.round;
    let dir = run.round_dir(live, round)?;
    start_final_round(run, live, round, false, false)?;
    let (mut opts, _open_dir, fds) = run.base_opts(live, &dir, "dump.log", CriuStage::DUMP, false)?;
    opts.notify_scripts = Some(true);
    opts.leave_running = Some(false);
    if plan.pre_copied {
        opts.track_mem = Some(true);
        opts.parent_img = Some(format!("../{}", round - 1));
    }
    // The guard starts (and is journaled) before the freeze, not inside it.
    run.ensure_guard()?;
    start_freeze(run);
    let deadline = run.freeze.map(|(_, d)| d).unwrap_or_else(|| Deadline::after(run.cfg.max_frozen, "--max-frozen"));
    let mut s = run.criu.session(fds, Some(&dir.join("criu-stderr.log")))?;
    s.set_log(dir.join("dump.log"));
    let mut fz = Frozen { dir: dir.clone(), criu_pid: s.pid(), hold: None, decision: None };
    fault::criu_started(fz.criu_pid);
    let watchdog = FreezeWatchdog::start(deadline, live.mem.try_clone().ok());
    live.control.shut_on_abort(&live.mem);
    let mut pusher = run.cork_pusher(live);
    let resp = {
        let (run, live, fz, pusher, watchdog) = (&mut *run, &mut *live, &mut fz, &mut pusher, &watchdog);
        let mut handler = |script: &str, pid: Option<i32>| -> Result<(), String> {
            fault::at("src", "notify", script);
            // The host type hears of every notification first; then phaul acts on it and answers CRIU.
            plugin(
                crate::plugins::notify(&mut live.htype, script, pid, crate::criu::rpc::notification_fd()),
                "host type",
                &run.cfg.htype,
            )
            .map_err(|e| e.to_string())?;
            match script {
                "post-dump" => {
                    watchdog.disarm();
                    // CRIU is done with the memory channel: phaul writes on it now, uncorked.
                    drop(pusher.take());
                    let _ = crate::sys::tcp_uncork(&live.mem);
                    live.control.clear_on_abort();
                    let d = overlap_frozen(run, live, fz, round);
                    let answer = match &d {
                        Decision::Committed => Ok(()),
                        _ => Err("the migration did not commit; resume the tree".to_string()),
                    };
                    fz.decision = Some(d);
                    answer
                }
                _ => Ok(()),
            }
        };
        s.call("DUMP", rpc::req(CriuReqType::Dump, Some(opts)), &mut handler)
    };
    fault::criu_gone(fz.criu_pid);
    drop(s);
    live.control.clear_on_abort();
    let fired = watchdog.fired();
    finish_overlap(run, live, fz, resp, fired)
}

/// Inside post-dump, overlap order.
fn overlap_frozen(run: &mut SourceRun<'_>, live: &mut Live, fz: &mut Frozen, round: u32) -> Decision {
    if let Err(e) = engage(run, live, fz) {
        return Decision::NotCommitted(e);
    }
    let lazy_restore = run.cfg.lazy_restore;
    let dir = fz.dir.clone();
    if let Err(e) = transfer_and_restore(run, live, round, &dir, true, false) {
        return Decision::NotCommitted(e);
    }
    let _ = lazy_restore;
    if let Err(e) = check_freeze(run, "the destination restored") {
        return Decision::NotCommitted(e);
    }
    let sent = match send_commit(run, live) {
        Ok(t) => t,
        Err(d) => return d,
    };
    let d = await_committed(run, live, sent);
    if matches!(d, Decision::Committed) {
        if let Err(e) = run.record(SourceState::Committed, "the destination runs the workload", |_| {}) {
            log::error!("{e}");
        }
    }
    d
}

/// After CRIU's DUMP returned, overlap order.
fn finish_overlap(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    fz: Frozen,
    resp: Result<CriuResp, CriuError>,
    watchdog_fired: bool,
) -> Result<(), MigrateError> {
    let criu_after = if matches!(resp, Err(CriuError::Died { .. })) { CriuAfter::Died } else { CriuAfter::Resumed };
    let mut fz = fz;
    match fz.decision.take() {
        Some(Decision::Committed) => {
            // CRIU killed the tree (post-dump answered with success) unless it died first; then phaul does it.
            let criu_killed = resp.is_ok();
            end_source_copy(run, &fz, criu_killed);
            dump_stats(run, &fz.dir, false);
            migrated(run, live)
        }
        Some(Decision::InDoubt(why)) => in_doubt(run, live, why),
        Some(Decision::Lost(why)) => lost(run, live, &fz, why),
        Some(Decision::NotCommitted(e)) | Some(Decision::Aborted(e)) => {
            let e = peer_reason(live, e);
            resume_source_copy(run, &fz, criu_after)?;
            rolled_back(run, live, e)
        }
        Some(Decision::CommitSent) => in_doubt(run, live, "the commit's answer never came".into()),
        None => {
            // Post-dump never came: CRIU failed the dump and resumed the tree itself (writing back pty data).
            let e = match resp {
                Err(e) if watchdog_fired => MigrateError::FreezeBound {
                    secs: run.cfg.max_frozen.as_secs(),
                    step: format!(
                        "CRIU dumped (its pages did not reach the destination in time; CRIU said: {})",
                        first_line(&e)
                    ),
                },
                Err(e) => peer_reason(live, MigrateError::Criu(e)),
                Ok(_) => MigrateError::Refused("CRIU's dump ended without its post-dump notification".into()),
            };
            rolled_back(run, live, e)
        }
    }
}

fn first_line(e: &CriuError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// An error replaced by the destination's own reason when it aborted unasked (its disk filled, its page server
/// died): that says more than the broken channel CRIU saw.
fn peer_reason(live: &Live, e: MigrateError) -> MigrateError {
    let wait = if matches!(e, MigrateError::Criu(_) | MigrateError::Wire(_) | MigrateError::Files(_)) {
        Duration::from_millis(500)
    } else {
        Duration::ZERO
    };
    match (live.control.wait_peer_abort(wait), &e) {
        (Some(f), MigrateError::Criu(_)) | (Some(f), MigrateError::Wire(_)) | (Some(f), MigrateError::Files(_)) => {
            MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors }
        }
        _ => e,
    }
}

/// The source's copy goes (the destination runs the workload).
fn end_source_copy(run: &mut SourceRun<'_>, fz: &Frozen, criu_killed: bool) {
    if let Some(h) = &fz.hold {
        if let Err(e) = run.keeper.end(h, criu_killed) {
            log::error!("the workload runs on the destination, but ending the source's frozen copy failed: {e}");
        }
    } else if !criu_killed {
        log::error!("the source's tree was not held, and CRIU did not end it");
    }
}

/// The source's copy runs again.
fn resume_source_copy(run: &mut SourceRun<'_>, fz: &Frozen, after: CriuAfter) -> Result<(), MigrateError> {
    let Some(h) = &fz.hold else { return Ok(()) };
    let tty_done = run.journal.as_ref().is_some_and(|j| j.tty_written_back);
    run.keeper.resume(h, after, &fz.dir, tty_done).map_err(MigrateError::Hold)?;
    run.record(SourceState::RolledBack, "resumed on the source", |j| j.tty_written_back = true)?;
    Ok(())
}

fn dump_stats(run: &mut SourceRun<'_>, dir: &Path, lazy: bool) {
    let Ok(st) = images::read_dump_stats(dir) else { return };
    let ms = run.freeze.map(|(t, _)| t.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
    let round = run.report.rounds.len() as u32 + 1;
    let r = RoundReport::new(round, "dump", &st, ms, page_size());
    run.progress.round(round, "dump", r.bytes_written, ms / 1000.0);
    run.report.channels.memory_pages += r.bytes_written;
    if !lazy {
        run.report.frozen_ms = Some(st.frozen_time_us as f64 / 1000.0);
    }
    run.report.rounds.push(r);
}

/// The end of a migration that moved: journal, drivers, `Finish`.
pub(super) fn migrated(run: &mut SourceRun<'_>, live: &mut Live) -> Result<(), MigrateError> {
    run.ended = Some(Ended::Migrated);
    if let Err(e) = run.record(SourceState::Migrated, "migrated", |_| {}) {
        log::error!("{e}");
    }
    let _ = live.fs.finish(Outcome::MIGRATED);
    finish_htype(run, live, Outcome::MIGRATED);
    run.progress.phase(Phase::Finish, "confirming");
    match live.control.request(Body::Finish(w::Finish { migrated: true, reason: String::new() }), run.wait_after()) {
        Ok(Body::FinishReply(r)) => {
            if !r.kept_images.is_empty() {
                run.report.destination_images = Some(r.kept_images);
            }
            if r.last_page_ms > 0 {
                if run.cfg.lazy || run.cfg.post_copy_after.is_some() || run.report.memory.strategy == "hybrid" {
                    run.report.post_copy_ms = Some(r.last_page_ms as f64);
                }
                if run.cfg.lazy_restore {
                    run.report.pages_loaded_ms = Some(r.last_page_ms as f64);
                }
            }
            Ok(())
        }
        Ok(Body::Failure(f)) if f.aborted => {
            // Post-copy / lazy restore: the destination lost the workload after it had started there.
            run.ended = Some(Ended::Lost);
            let _ = run.record(SourceState::Lost, &f.message, |_| {});
            Err(MigrateError::Lost(f.message))
        }
        Ok(other) => {
            log::warn!("the destination answered Finish with {}", wire::body_name(&other));
            Ok(())
        }
        Err(e) => {
            if let Some(f) = live.control.peer_aborted().filter(|f| f.aborted) {
                // The destination ended the session on its own after the commit: a post-copy whose pages could not
                // all arrive (its lazy-pages daemon failed, and may have ended CRIU's transfer the way a finished
                // one ends, so this side's CRIU saw success). The workload is lost.
                run.ended = Some(Ended::Lost);
                let _ = run.record(SourceState::Lost, &f.message, |_| {});
                return Err(MigrateError::Lost(f.message));
            }
            log::warn!("the workload runs on the destination, but its answer to Finish did not come: {e}");
            Ok(())
        }
    }
}

impl SourceRun<'_> {
    /// The bound on waits once the freeze is over.
    fn wait_after(&self) -> Deadline {
        Deadline::after(self.cfg.timeout, "--timeout")
    }
}

/// The end of a migration that rolled back: the destination is told unless it said so itself.
pub(super) fn rolled_back(run: &mut SourceRun<'_>, live: &mut Live, e: MigrateError) -> Result<(), MigrateError> {
    run.ended = Some(Ended::RolledBack);
    let _ = run.record(SourceState::RolledBack, &e.to_string(), |_| {});
    if live.control.peer_aborted().is_none() {
        let _ = live.control.request(
            Body::Finish(w::Finish { migrated: false, reason: e.to_string() }),
            Deadline::after(Duration::from_secs(10).min(run.cfg.timeout), "--timeout"),
        );
    }
    let _ = live.fs.finish(Outcome::ROLLED_BACK);
    finish_htype(run, live, Outcome::ROLLED_BACK);
    Err(e)
}

pub(super) fn in_doubt(run: &mut SourceRun<'_>, live: &mut Live, why: String) -> Result<(), MigrateError> {
    run.ended = Some(Ended::InDoubt);
    let _ = run.record(SourceState::InDoubt, &why, |_| {});
    if let Some(g) = run.guard.as_mut() {
        // The guard leaves the session to `phaul resolve` now.
        (g.tell)("in-doubt");
    }
    let copies = run.copies(Ended::InDoubt);
    let how = match &live.to {
        Some((addr, _)) => format!(" (it asks the destination at {addr} again)"),
        None => " with --fdrpc/--fdmem given new connections to the destination's `phaul serve`".into(),
    };
    Err(MigrateError::InDoubt {
        session: live.session.clone(),
        detail: why,
        copies: format!("{}.", capitalize(&copies)),
        how,
    })
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn lost(run: &mut SourceRun<'_>, live: &mut Live, fz: &Frozen, why: String) -> Result<(), MigrateError> {
    // The destination ran the workload: the source's frozen copy is stale and goes too.
    end_source_copy(run, fz, false);
    run.ended = Some(Ended::Lost);
    let _ = run.record(SourceState::Lost, &why, |_| {});
    let _ = live.fs.finish(Outcome::ROLLED_BACK);
    finish_htype(run, live, Outcome::ROLLED_BACK);
    Err(MigrateError::Lost(why))
}

/// Post-copy and hybrid.
///
/// CRIU's lazy restore needs pages from the source's CRIU before it reaches its post-restore hold (the restorer
/// touches the tree's memory), and the source's CRIU serves pages only after post-dump is answered. So post-dump
/// is answered with success before the destination holds its copy; that is safe because the source's relay
/// passes the end of the transfer on to CRIU (which then kills the tree) only once the destination confirmed
/// that its copy runs, and fails CRIU's transfer otherwise (CRIU then resumes the tree, into phaul's freezer).
/// The commit itself is sent by the control channel's reader thread as soon as the destination reports its copy
/// held, while this thread sits inside CRIU's DUMP request.
fn post_copy(run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
    run.progress.phase(Phase::FinalDump, "final dump (the workload is frozen)");
    let round = plan.round;
    let dir = run.round_dir(live, round)?;
    start_final_round(run, live, round, true, false)?;
    let (mut opts, _open_dir, _fds) = run.base_opts(live, &dir, "dump.log", CriuStage::DUMP, true)?;
    opts.notify_scripts = Some(true);
    opts.leave_running = Some(false);
    if plan.pre_copied {
        opts.track_mem = Some(true);
        opts.parent_img = Some(format!("../{}", round - 1));
    }
    // CRIU keeps the pages and serves them on loopback after the post-dump notification; phaul relays them over
    // the memory channel to the destination's lazy-pages daemon.
    let port = lazy::free_port().map_err(lazy::LazyError::Io)?;
    opts.lazy_pages = Some(true);
    opts.ps = Some(CriuPageServerInfo {
        address: Some("127.0.0.1".into()),
        port: Some(i32::from(port)),
        ..Default::default()
    });
    run.ensure_guard()?;
    start_freeze(run);
    let mut s = run.criu.session(Vec::new(), Some(&dir.join("criu-stderr.log")))?;
    s.set_log(dir.join("dump.log"));
    // The lazy dump returns when the last page has moved, however long that takes: the freeze before the commit
    // is bounded by --max-frozen (the watchdog) and the transfer after it by its progress (the relay); this is
    // only the outer bound.
    s.set_timeout(POST_COPY_OUTER_BOUND.max(run.cfg.timeout));
    let mut fz = Frozen { dir: dir.clone(), criu_pid: s.pid(), hold: None, decision: None };
    fault::criu_started(fz.criu_pid);
    let mut relay: Option<lazy::SourceRelay> = None;
    let watchdog_done = Arc::new(AtomicBool::new(false));
    let watchdog_fired = Arc::new(AtomicBool::new(false));
    let resp = {
        let (run, live, fz, relay) = (&mut *run, &mut *live, &mut fz, &mut relay);
        let (wd, wf) = (watchdog_done.clone(), watchdog_fired.clone());
        let mut handler = |script: &str, pid: Option<i32>| -> Result<(), String> {
            fault::at("src", "notify", script);
            // The host type hears of every notification first; then phaul acts on it and answers CRIU.
            plugin(
                crate::plugins::notify(&mut live.htype, script, pid, crate::criu::rpc::notification_fd()),
                "host type",
                &run.cfg.htype,
            )
            .map_err(|e| e.to_string())?;
            match script {
                "post-dump" => {
                    let d = post_copy_frozen(run, live, fz, round, port, relay, wd.clone(), wf.clone());
                    if !matches!(d, Decision::CommitSent) {
                        // CRIU starts its lazy page server even after a failed notification: connect and fail its
                        // transfer at once, so that it resumes the tree.
                        match relay.as_ref() {
                            Some(r) => r.poison(),
                            None => {
                                if let Ok(fd) = live.mem.dup_fd() {
                                    let committed = Arc::new(AtomicBool::new(false));
                                    let hdr = lazy::page_server_request_size(run.criu_version);
                                    let r = lazy::SourceRelay::start(port, fd, run.cfg.timeout, committed, hdr);
                                    r.abort();
                                    *relay = Some(r);
                                }
                            }
                        }
                    }
                    let answer = match &d {
                        Decision::CommitSent => Ok(()),
                        _ => Err("the migration did not commit; resume the tree".to_string()),
                    };
                    fz.decision = Some(d);
                    answer
                }
                _ => Ok(()),
            }
        };
        s.call("DUMP", rpc::req(CriuReqType::Dump, Some(opts)), &mut handler)
    };
    fault::criu_gone(fz.criu_pid);
    drop(s);
    watchdog_done.store(true, Ordering::SeqCst);
    let mut relay_reason = None;
    if let Some(r) = relay {
        relay_reason = r.reason();
        if let Err(e) = r.join() {
            log::warn!("the lazy-page relay ended with: {e}");
        }
    }
    let confirmed = live.control.seen.committed.load(Ordering::SeqCst);
    let sent = live.control.auto_commit_sent();
    if let (Some(at), Some(h)) = (sent, run.report.handover.as_mut()) {
        h.committed = true;
        h.commit_sent_ms = run.freeze.map(|(t, _)| at.saturating_duration_since(t).as_secs_f64() * 1000.0);
    }
    if sent.is_some() {
        let _ = run.record(SourceState::Committing, "Commit sent (post-copy): the point of no return", |_| {});
    }
    // The destination's answers are in the queue: RestoreReply, then Committed (or a failure).
    let mut answer: Option<Decision> = None;
    if matches!(fz.decision, Some(Decision::CommitSent)) {
        let d = Deadline::after(run.cfg.resolve_timeout.min(run.cfg.timeout), "--resolve-timeout");
        loop {
            match live.control.recv(d, "Restore and Commit") {
                Ok(Body::RestoreReply(r)) => record_restore(run, r.pid, r.stats, r.restore_wall_us),
                Ok(Body::Committed(c)) => {
                    committed(run, live, c, sent.unwrap_or_else(Instant::now));
                    answer = Some(Decision::Committed);
                    break;
                }
                Ok(Body::Failure(f)) => {
                    answer = Some(Decision::Aborted(MigrateError::DestinationAborted {
                        message: f.message,
                        criu_errors: f.criu_errors,
                    }));
                    break;
                }
                Ok(other) => log::debug!("post-copy: {} from the destination", wire::body_name(&other)),
                Err(e) => {
                    if sent.is_some() {
                        answer = Some(resolve_again(run, live, format!("no answer to Commit ({e})")));
                    }
                    break;
                }
            }
        }
    }
    // CRIU answered post-dump with success, so when it resumes the tree its sockets are still in repair mode and
    // its lock in place: the way back is the one after a dead CRIU.
    let criu_after = CriuAfter::Died;
    let was_committed = confirmed || matches!(answer, Some(Decision::Committed));
    match (fz.decision.take(), answer) {
        (Some(Decision::CommitSent), _) if was_committed && resp.is_ok() => {
            end_source_copy(run, &fz, true);
            dump_stats(run, &fz.dir, true);
            if let Some((t, _)) = run.freeze {
                run.report.post_copy_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
            }
            migrated(run, live)
        }
        (Some(Decision::CommitSent), _) if was_committed => {
            // The destination ran the workload, and the page transfer broke: lost.
            lost(run, live, &fz, "the page transfer broke after the workload had started on the destination".into())
        }
        (Some(Decision::CommitSent), Some(Decision::Aborted(e))) => {
            // The destination never let its copy run: the source's copy (intact, frozen) resumes.
            resume_source_copy(run, &fz, criu_after)?;
            rolled_back(run, live, e)
        }
        (Some(Decision::CommitSent), Some(Decision::Lost(why))) => lost(run, live, &fz, why),
        (Some(Decision::CommitSent), Some(Decision::InDoubt(why))) => in_doubt(run, live, why),
        (Some(Decision::CommitSent), _) => {
            // Nothing was committed (the destination never reported its copy held in time).
            let e = if watchdog_fired.load(Ordering::SeqCst) {
                MigrateError::FreezeBound {
                    secs: run.cfg.max_frozen.as_secs(),
                    step: "the destination restored (post-copy)".into(),
                }
            } else {
                match (resp, relay_reason) {
                    (Err(e), None) => peer_reason(live, MigrateError::Criu(e)),
                    (Err(_), Some(why)) => {
                        peer_reason(live, MigrateError::Refused(format!("{why}; nothing was committed")))
                    }
                    (Ok(_), _) => MigrateError::Refused("the page transfer ended before the commit".into()),
                }
            };
            resume_source_copy(run, &fz, criu_after)?;
            rolled_back(run, live, e)
        }
        (Some(Decision::NotCommitted(e)), _) => {
            let e = peer_reason(live, e);
            resume_source_copy(run, &fz, CriuAfter::Resumed)?;
            rolled_back(run, live, e)
        }
        (Some(Decision::InDoubt(why)), _) | (Some(Decision::Lost(why)), _) => in_doubt(run, live, why),
        (Some(_), _) => in_doubt(run, live, "the commit's answer never came".into()),
        (None, _) => {
            let e = match resp {
                Err(e) => peer_reason(live, MigrateError::Criu(e)),
                Ok(_) => MigrateError::Refused("CRIU's dump ended without its post-dump notification".into()),
            };
            rolled_back(run, live, e)
        }
    }
}

/// Inside post-dump, post-copy: everything but the pages, the restore asked for, the reader thread armed to
/// commit once the destination holds its copy, the relay started. Returns `CommitSent` when post-dump may be
/// answered with success (the pages may flow; see [`post_copy`]).
#[allow(clippy::too_many_arguments)]
fn post_copy_frozen(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    fz: &mut Frozen,
    round: u32,
    port: u16,
    relay: &mut Option<lazy::SourceRelay>,
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
) -> Decision {
    if let Err(e) = engage(run, live, fz) {
        return Decision::NotCommitted(e);
    }
    let dir = fz.dir.clone();
    if let Err(e) = transfer(run, live, round, &dir, false) {
        return Decision::NotCommitted(e);
    }
    let deadline = run.freeze.map(|(_, d)| d.at).unwrap_or_else(Instant::now);
    let cancelled = Arc::new(AtomicBool::new(false));
    if let (Some(js), Some(j)) = (run.journals.clone(), run.journal.clone()) {
        let mut j = j;
        let status = run.progress.status().cloned();
        live.control.arm_auto_commit(AutoCommit {
            deadline,
            record: Box::new(move || {
                j.state = SourceState::Committing;
                j.note = "Commit decided (post-copy): the point of no return".into();
                let written = js.write(&mut j).is_ok();
                if let (true, Some(s)) = (written, &status) {
                    s.emit("state", serde_json::json!({ "state": "committing", "note": j.note }));
                }
                written
            }),
            cancelled: cancelled.clone(),
        });
    }
    run.progress.phase(Phase::Restore, "post-copy: restoring on the destination; its pages follow on demand");
    if let Err(e) = live.control.send(Body::Restore(Restore { round, lazy: true })) {
        cancelled.store(true, Ordering::SeqCst);
        return Decision::NotCommitted(e.into());
    }
    let fd = match live.mem.dup_fd() {
        Ok(fd) => fd,
        Err(e) => {
            cancelled.store(true, Ordering::SeqCst);
            return Decision::NotCommitted(MigrateError::Refused(format!("cannot relay lazy pages: {e}")));
        }
    };
    let hdr = lazy::page_server_request_size(run.criu_version);
    let r = lazy::SourceRelay::start(port, fd, run.cfg.timeout, live.control.seen.committed.clone(), hdr);
    // Until the commit is sent: a destination that aborts, or the freeze bound, fails CRIU's transfer.
    let poisoner = r.poisoner();
    let aborted = live.control.aborted.clone();
    let seen = live.control.seen.clone();
    let auto = live.control.auto_commit_handle();
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if seen.sent_at.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                return;
            }
            let peer = aborted.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if peer || Instant::now() >= deadline {
                // Cancelled under the reader's lock: either the commit went out before (then nothing is undone)
                // or it never will.
                if crate::engine::control::Control::cancel_auto_commit(&auto, &seen) {
                    return;
                }
                if !peer {
                    fired.store(true, Ordering::SeqCst);
                }
                poisoner.poison();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    *relay = Some(r);
    Decision::CommitSent
}

/// The outer bound on a post-copy dump (see [`post_copy`]).
const POST_COPY_OUTER_BOUND: Duration = Duration::from_secs(24 * 3600);

/// The sequential order.
fn sequential(run: &mut SourceRun<'_>, live: &mut Live, plan: Plan) -> Result<(), MigrateError> {
    run.progress.phase(Phase::FinalDump, "final dump into the source's own images (the workload is frozen)");
    let round = plan.round;
    let dir = run.round_dir(live, round)?;
    start_final_round(run, live, round, false, true)?;
    let (mut opts, _open_dir, fds) = run.base_opts(live, &dir, "dump.log", CriuStage::DUMP, true)?;
    opts.notify_scripts = Some(true);
    opts.leave_running = Some(false);
    if plan.pre_copied {
        opts.track_mem = Some(true);
        opts.parent_img = Some(format!("../{}", round - 1));
    }
    run.ensure_guard()?;
    start_freeze(run);
    let mut s = run.criu.session(fds, Some(&dir.join("criu-stderr.log")))?;
    s.set_log(dir.join("dump.log"));
    let mut fz = Frozen { dir: dir.clone(), criu_pid: s.pid(), hold: None, decision: None };
    fault::criu_started(fz.criu_pid);
    let resp = {
        let (run, live, fz) = (&mut *run, &mut *live, &mut fz);
        let mut handler = |script: &str, pid: Option<i32>| -> Result<(), String> {
            fault::at("src", "notify", script);
            // The host type hears of every notification first; then phaul acts on it and answers CRIU.
            plugin(
                crate::plugins::notify(&mut live.htype, script, pid, crate::criu::rpc::notification_fd()),
                "host type",
                &run.cfg.htype,
            )
            .map_err(|e| e.to_string())?;
            match script {
                "post-dump" => {
                    let r = sequential_frozen(run, live, fz, round);
                    let answer =
                        if r.is_ok() { Ok(()) } else { Err("the images did not reach the destination".to_string()) };
                    fz.decision = Some(match r {
                        Ok(()) => Decision::CommitSent,
                        Err(e) => Decision::NotCommitted(e),
                    });
                    answer
                }
                _ => Ok(()),
            }
        };
        s.call("DUMP", rpc::req(CriuReqType::Dump, Some(opts)), &mut handler)
    };
    fault::criu_gone(fz.criu_pid);
    drop(s);
    let criu_after = if matches!(resp, Err(CriuError::Died { .. })) { CriuAfter::Died } else { CriuAfter::Resumed };
    match fz.decision.take() {
        Some(Decision::CommitSent) if resp.is_ok() => {}
        Some(Decision::CommitSent) => {
            // CRIU failed after post-dump was answered: the tree is held frozen, its images complete. Rather than
            // trust a tree CRIU may have half let go of, it resumes here and nothing moves.
            let e = MigrateError::Criu(resp.err().unwrap_or(CriuError::Died {
                op: "DUMP",
                log: None,
                log_errors: Vec::new(),
            }));
            resume_source_copy(run, &fz, criu_after)?;
            return rolled_back(run, live, e);
        }
        Some(Decision::NotCommitted(e)) => {
            let e = peer_reason(live, e);
            resume_source_copy(run, &fz, criu_after)?;
            return rolled_back(run, live, e);
        }
        _ => {
            let e = match resp {
                Err(e) => peer_reason(live, MigrateError::Criu(e)),
                Ok(_) => MigrateError::Refused("CRIU's dump ended without its post-dump notification".into()),
            };
            return rolled_back(run, live, e);
        }
    }
    // The tree is gone (CRIU killed it); the source's copy is its image set from here on.
    end_source_copy(run, &fz, true);
    dump_stats(run, &fz.dir, false);
    run.progress.phase(Phase::Restore, "restoring on the destination (held until the commit)");
    let d = match live
        .control
        .request(Body::Restore(Restore { round, lazy: false }), run.wait())
        .map_err(|e| frozen_wait(run, e, "the destination restored"))
    {
        Ok(Body::RestoreReply(r)) if r.held => {
            record_restore(run, r.pid, r.stats, r.restore_wall_us);
            match send_commit(run, live) {
                Ok(sent) => await_committed(run, live, sent),
                Err(d) => d,
            }
        }
        Ok(other) => Decision::NotCommitted(
            WireError::Unexpected { expected: "RestoreReply", got: wire::body_name(&other) }.into(),
        ),
        Err(e) => Decision::NotCommitted(e),
    };
    match d {
        Decision::Committed => {
            let _ = run.record(SourceState::Committed, "the destination runs the workload", |_| {});
            migrated(run, live)
        }
        Decision::NotCommitted(e) | Decision::Aborted(e) => {
            let e = peer_reason(live, e);
            tell_abort(run, live, &e);
            restore_on_source(run, live, &fz.dir)?;
            run.ended = Some(Ended::RolledBack);
            let _ = live.fs.finish(Outcome::ROLLED_BACK);
            finish_htype(run, live, Outcome::ROLLED_BACK);
            Err(e)
        }
        Decision::InDoubt(why) | Decision::Lost(why) => in_doubt(run, live, why),
        Decision::CommitSent => in_doubt(run, live, "the commit's answer never came".into()),
    }
}

/// Inside post-dump, sequential: the last filesystem round and every image, then the image set made durable.
fn sequential_frozen(
    run: &mut SourceRun<'_>,
    live: &mut Live,
    fz: &mut Frozen,
    round: u32,
) -> Result<(), MigrateError> {
    engage(run, live, fz)?;
    let dir = fz.dir.clone();
    run.progress.phase(Phase::FsFinal, "final filesystem sync");
    let fs_round = run.final_fs_round();
    run.fs_round(live, fs_round, true).map_err(|e| widen(run, e, "the final filesystem round ran"))?;
    run.progress.phase(Phase::Images, "sending images");
    let imgs = files::image_files(&dir)?;
    let bytes: u64 = imgs.iter().map(|(_, h)| h.size).sum();
    run.send_files(live, round, w::files::Target::Images, imgs).map_err(|e| widen(run, e, "the images were sent"))?;
    run.report.channels.memory_pages += bytes;
    run.send_extra_files(live, round)?;
    check_freeze(run, "the images were sent")?;
    sync_dir(&dir)?;
    run.record(SourceState::ImagesOnly, "the tree ends; the source's copy is its image set", |j| j.hold = None)?;
    Ok(())
}

/// fsyncs every file of a directory and the directory.
fn sync_dir(dir: &Path) -> Result<(), MigrateError> {
    let err = |source| MigrateError::WriteImage { path: dir.to_path_buf(), source };
    for e in std::fs::read_dir(dir).map_err(err)?.flatten() {
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::File::open(e.path()).and_then(|f| f.sync_all()).map_err(err)?;
        }
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(err)
}

fn tell_abort(run: &mut SourceRun<'_>, live: &mut Live, e: &MigrateError) {
    if live.control.peer_aborted().is_none() {
        let _ = live.control.request(
            Body::Finish(w::Finish { migrated: false, reason: e.to_string() }),
            Deadline::after(Duration::from_secs(10).min(run.cfg.timeout), "--timeout"),
        );
    }
}

/// Sequential roll-back: restores the workload on the source from its own image set.
pub(crate) fn restore_on_source(run: &mut SourceRun<'_>, live: &mut Live, dir: &Path) -> Result<(), MigrateError> {
    run.progress.phase(Phase::Rollback, "restoring the workload on the source from its own images");
    let h = plugin(crate::plugins::criu_options(&mut live.htype, CriuStage::RESTORE), "host type", &run.cfg.htype)?;
    let pid = super::super::resolve::restore_from_images(run.criu, dir, &h).map_err(|e| {
        MigrateError::Refused(format!(
            "restoring the workload on the source from {} failed: {e}; the images are kept there",
            dir.display()
        ))
    })?;
    run.report.source_pid = Some(pid);
    let root = ProcId::of(pid);
    run.record(SourceState::RolledBack, "restored on the source from its own images", |j| j.root = root)?;
    Ok(())
}

/// What a tree holds that a restore beside its frozen self on shared storage would disturb: file locks, bound
/// unix socket files, FIFOs. Each entry names one, for the message.
pub(super) fn shared_state_of_tree(root: i32) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(procs) = crate::hold::procs::tree_processes(root) else { return Vec::new() };
    let mut out = Vec::new();
    let mut files: Vec<(u64, u64, String)> = Vec::new();
    let mut sockets: Vec<u64> = Vec::new();
    for p in &procs {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", p.pid)) else { continue };
        for e in fds.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            let link = link.to_string_lossy().into_owned();
            if let Some(ino) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                if let Ok(i) = ino.parse() {
                    sockets.push(i);
                }
                continue;
            }
            let Ok(m) = std::fs::metadata(e.path()) else { continue };
            if m.file_type().is_fifo() && link.starts_with('/') {
                out.push(format!("the FIFO {link}"));
            }
            files.push((m.dev(), m.ino(), link));
        }
    }
    if let Ok(locks) = std::fs::read_to_string("/proc/locks") {
        for l in locks.lines() {
            // "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            let f: Vec<&str> = l.split_whitespace().collect();
            let Some(id) = f.iter().find(|x| x.matches(':').count() == 2 && !x.ends_with(':')) else { continue };
            let parts: Vec<&str> = id.split(':').collect();
            let (Ok(maj), Ok(min), Ok(ino)) =
                (u64::from_str_radix(parts[0], 16), u64::from_str_radix(parts[1], 16), parts[2].parse::<u64>())
            else {
                continue;
            };
            let dev = nix::sys::stat::makedev(maj, min);
            if let Some((_, _, path)) = files.iter().find(|(d, i, _)| *d == dev && *i == ino) {
                let kind = f.get(1).copied().unwrap_or("a");
                let s = format!("a {kind} lock on {path}");
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    if let Ok(unix) = std::fs::read_to_string(format!("/proc/{root}/net/unix")) {
        for l in unix.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let (Ok(ino), path) = (f[6].parse::<u64>(), f[7]) else { continue };
            if path.starts_with('/') && sockets.contains(&ino) {
                out.push(format!("the unix socket file {path}"));
            }
        }
    }
    out
}
