//! Restart mode (`--mode restart`): no checkpoint, no CRIU. Filesystem rounds while the workload runs, the host
//! type's `stop` here, the final filesystem round, then `Start`: the destination's host type starts the workload
//! from the files it received.
//!
//! The copy rules are those of a live migration, with "stopped" in place of "frozen": until `Start` is sent the
//! source's copy is its stopped workload and its files, and any failure starts it here again; `Start` is the point
//! of no return (journalled first, like `Commit`), after which the source starts its copy again only once it has
//! learnt that the destination started nothing.

use std::time::Instant;

use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w};

use super::handover::{in_doubt, migrated, resolve_again, rolled_back, Decision};
use super::{plugin, Live, MigrateError, SourceRun};
use crate::engine::control::Deadline;
use crate::engine::{fault, Phase};
use crate::journal::{ProcId, SourceState};
use crate::wire::{self, WireError};

pub(super) fn restart(run: &mut SourceRun<'_>, live: &mut Live) -> Result<(), MigrateError> {
    run.report.mode = "restart";
    run.report.memory.strategy = "none";
    run.report.memory.reason = "restart mode moves no memory: the workload is stopped and started again".into();
    let round = run.live_fs_rounds(live, "copying the filesystem (the workload runs)")?;
    // From here the source's copy may be a stopped workload: the guard settles it should this process die.
    run.ensure_guard()?;
    run.record(SourceState::Stopped, "restart mode: the workload is being stopped on the source", |_| {})?;
    fault::at("src", "step", "stopping");
    run.progress.phase(Phase::Stop, "stopping the workload (restart mode)");
    let stopped = Instant::now();
    run.report.freeze_started = Some(stopped);
    if let Err(e) = plugin(live.htype.stop(), "host type", &run.cfg.htype) {
        return start_here(run, live, e);
    }
    fault::at("src", "step", "stopped");
    run.progress.phase(Phase::FsFinal, "final filesystem sync (the workload is stopped)");
    if let Err(e) = run.fs_round(live, round + 1, true) {
        return start_here(run, live, e);
    }
    // What the host type carries beside the files (a container's configuration) goes before `Start`.
    if let Err(e) = run.send_extra_files(live, round + 1) {
        return start_here(run, live, e);
    }
    if live.control.gone() {
        let e = MigrateError::Wire(WireError::Closed { channel: "control" });
        return start_here(run, live, e);
    }
    // The point of no return: from now on the destination may be running the workload.
    if let Err(e) = run.record(SourceState::Committing, "Start decided: the point of no return", |_| {}) {
        return start_here(run, live, e);
    }
    fault::at("src", "step", "starting");
    if let Some(h) = run.report.handover.as_mut() {
        h.ending = "restart";
        h.committed = true;
    }
    run.progress.phase(Phase::Start, "starting the workload on the destination");
    let sent = Instant::now();
    let decision = match live.control.send(Body::Start(w::Start {})) {
        Err(e) => resolve_again(run, live, format!("sending Start failed ({e})")),
        Ok(()) => match live.control.recv(Deadline::after(run.cfg.timeout, "--timeout"), "Start") {
            Ok(Body::StartReply(r)) => {
                if r.pid > 0 {
                    run.report.restored_pid = Some(r.pid);
                }
                Decision::Committed
            }
            Ok(Body::Failure(f)) => {
                // The destination answers Start with a failure only once it has ended the session: nothing runs
                // there.
                Decision::Aborted(MigrateError::DestinationAborted { message: f.message, criu_errors: f.criu_errors })
            }
            Ok(other) => {
                resolve_again(run, live, format!("the destination answered Start with {}", wire::body_name(&other)))
            }
            Err(e) => resolve_again(run, live, format!("no answer to Start ({e})")),
        },
    };
    match decision {
        Decision::Committed => {
            let arrived = live.control.last_arrival.unwrap_or_else(Instant::now).max(sent);
            run.report.outage_ms = Some(arrived.saturating_duration_since(stopped).as_secs_f64() * 1000.0);
            run.report.downtime_ms = run.report.outage_ms;
            let _ = run.record(SourceState::Committed, "the destination started the workload", |_| {});
            migrated(run, live)
        }
        Decision::NotCommitted(e) | Decision::Aborted(e) => start_here(run, live, e),
        Decision::InDoubt(why) | Decision::Lost(why) => in_doubt(run, live, why),
        Decision::CommitSent => in_doubt(run, live, "the answer to Start never came".into()),
    }
}

/// The migration failed before the destination started anything: the workload starts here again.
fn start_here(run: &mut SourceRun<'_>, live: &mut Live, e: MigrateError) -> Result<(), MigrateError> {
    let alive = ProcId::of(live.root_pid).is_some_and(|p| p.alive());
    if !alive {
        run.progress.phase(Phase::Rollback, "starting the workload again on the source");
        match plugin(live.htype.start(), "host type", &run.cfg.htype) {
            Ok(pid) => {
                log::warn!("restart mode rolled back: the workload was started again here (pid {pid})");
                run.report.source_pid = Some(pid);
                let _ = run.record(SourceState::Stopped, "started again on the source", |j| j.root = ProcId::of(pid));
            }
            Err(start) => {
                let why = format!(
                    "{e}; then starting the workload again on this host failed too ({start}): it is stopped here, its files are intact; start it with its own tools"
                );
                return rolled_back(run, live, MigrateError::Refused(why));
            }
        }
    }
    rolled_back(run, live, e)
}
