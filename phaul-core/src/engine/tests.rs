//! The order of actions at each failure point of the handover, without CRIU: the source engine runs against a
//! recording CRIU ([`FakeCriu`]), a recording hold ([`Keeper`]) and a scripted destination on a socketpair; the
//! destination engine against the recording CRIU and a scripted source. One log shows everything in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use phaul_abi::{
    make_fs_receiver, make_fs_sender, make_host_type, FsArgs, FsReceiver, FsReceiverBox, FsSender, FsSenderBox,
    HostType, HostTypeArgs, HostTypeBox, Mode, PluginError, PluginResult, Role,
};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w};
use phaul_proto::PROTOCOL_VERSION;

use super::destination::{serve_session, DestinationChannels, DestinationConfig, DestinationContext};
use super::source::{migrate, Ended, HandoverOrder, PreDump, SourceChannels, SourceConfig, SourceContext};
use super::{OnNoConverge, Policy};
use crate::criu::fake::{FakeCriu, Script};
use crate::criu::CriuBackend;
use crate::hold::{CriuAfter, FreezerRecord, HoldError, HoldRecord, Keeper};
use crate::journal::{DestinationJournal, DestinationState, Journals, ProcId, SourceJournal, SourceState};
use crate::plugins::{Drivers, PluginLoadError};
use crate::transport::{Channel, ChannelName};
use crate::wire;

/// Each test's log, by the host-type id the test uses (tests run in parallel in one process).
fn logs() -> &'static Mutex<HashMap<String, (i32, FakeCriu)>> {
    static L: OnceLock<Mutex<HashMap<String, (i32, FakeCriu)>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(HashMap::new()))
}

fn log_of(key: &str) -> Option<(i32, FakeCriu)> {
    logs().lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
}

struct FakeHost {
    key: String,
}

impl HostType for FakeHost {
    fn root_pid(&mut self) -> PluginResult<i32> {
        log_of(&self.key).map(|(p, _)| p).ok_or_else(|| PluginError::not_found("no such test"))
    }
    fn finish(&mut self, outcome: phaul_abi::Outcome) -> PluginResult<()> {
        if let Some((_, l)) = log_of(&self.key) {
            l.note(format!("htype finish {outcome:?}"));
        }
        Ok(())
    }
}

fn new_host(args: &HostTypeArgs) -> PluginResult<FakeHost> {
    Ok(FakeHost { key: args.id.to_string() })
}

struct FakeFs;
impl FsSender for FakeFs {}
impl FsReceiver for FakeFs {}

fn new_fs(_: &FsArgs) -> PluginResult<FakeFs> {
    Ok(FakeFs)
}

struct FakeDrivers;

impl Drivers for FakeDrivers {
    fn host_type(
        &self,
        _name: &str,
        role: Role,
        mode: Mode,
        id: &str,
        _o: &[(String, String)],
        _w: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        let args = HostTypeArgs {
            role,
            mode,
            id: id.into(),
            options: Default::default(),
            work_dir: "".into(),
            host: phaul_abi::plain_services(),
            more: Default::default(),
        };
        make_host_type(&args, new_host).into_result().map_err(|error| PluginLoadError::Driver {
            kind: "host type",
            name: "fake".into(),
            error,
        })
    }
    fn fs_sender(
        &self,
        _n: &str,
        mode: Mode,
        _o: &[(String, String)],
        _fd: Option<i32>,
        _r: &[String],
        _w: &Path,
    ) -> Result<FsSenderBox, PluginLoadError> {
        let args = FsArgs {
            role: Role::SOURCE,
            mode,
            options: Default::default(),
            data_fd: -1,
            roots: Default::default(),
            work_dir: "".into(),
            host: phaul_abi::plain_services(),
            more: Default::default(),
        };
        make_fs_sender(&args, new_fs).into_result().map_err(|error| PluginLoadError::Driver {
            kind: "fs",
            name: "fake".into(),
            error,
        })
    }
    fn fs_receiver(
        &self,
        _n: &str,
        mode: Mode,
        _o: &[(String, String)],
        _fd: Option<i32>,
        _r: &[String],
        _w: &Path,
    ) -> Result<FsReceiverBox, PluginLoadError> {
        let args = FsArgs {
            role: Role::DESTINATION,
            mode,
            options: Default::default(),
            data_fd: -1,
            roots: Default::default(),
            work_dir: "".into(),
            host: phaul_abi::plain_services(),
            more: Default::default(),
        };
        make_fs_receiver(&args, new_fs).into_result().map_err(|error| PluginLoadError::Driver {
            kind: "fs",
            name: "fake".into(),
            error,
        })
    }
    fn default_fs(&self, _htype: &str) -> Option<String> {
        Some("fakefs".into())
    }
    fn ensure_fs(&self, _name: &str) -> Result<(), PluginLoadError> {
        Ok(())
    }
    fn config_path(&self) -> PathBuf {
        PathBuf::from("test")
    }
}

/// A hold that only records.
struct RecordingKeeper(FakeCriu);

impl Keeper for RecordingKeeper {
    fn engage(&mut self, _name: &str, root: i32) -> Result<HoldRecord, HoldError> {
        self.0.note("hold engage");
        let me = ProcId::of(root).ok_or(HoldError::Gone { pid: root })?;
        Ok(HoldRecord {
            procs: vec![me],
            freezer: FreezerRecord { path: "/nonexistent".into(), members: Vec::new() },
            netlock: None,
            tcp: Vec::new(),
        })
    }
    fn resume(&mut self, _r: &HoldRecord, after: CriuAfter, _d: &Path, _t: bool) -> Result<(), HoldError> {
        self.0.note(format!("hold resume ({after:?})"));
        Ok(())
    }
    fn end(&mut self, _r: &HoldRecord, criu_killed: bool) -> Result<(), HoldError> {
        self.0.note(if criu_killed { "hold end (CRIU killed it)" } else { "hold end (phaul kills it)" });
        Ok(())
    }
}

/// A child process to stand for a workload or a restored tree (so that a kill by pid hits only it).
struct Sleeper(Child);

impl Sleeper {
    fn new() -> Sleeper {
        Sleeper(Command::new("sleep").arg("60").stdin(Stdio::null()).spawn().expect("sleep"))
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pair() -> (Channel, Channel) {
    let (a, b) = crate::sys::stream_pair().expect("socketpair");
    (Channel::new(ChannelName::Rpc, a), Channel::new(ChannelName::Rpc, b))
}

/// What the scripted destination does with one message.
enum Act {
    Reply(Body),
    /// Say nothing more and hang up.
    Close,
    /// Say nothing for a while, then this.
    Later(Duration, Body),
    /// Answer, then say something unasked.
    Then(Body, Body),
}

fn default_reply(b: &Body, pid: i32) -> Act {
    Act::Reply(match b {
        Body::Hello(_) => Body::HelloReply(w::HelloReply {
            protocol_version: PROTOCOL_VERSION,
            phaul_version: "test".into(),
            criu: Some(w::CriuVersion { major: 4, minor: 2, sublevel: 1, text: "4.2.1".into() }),
            features: Vec::new(),
            timeout_ms: 0,
        }),
        Body::CpuCheck(_) => Body::CpuCheckReply(w::CpuCheckReply {}),
        Body::Setup(_) => Body::SetupReply(w::SetupReply { image_dir: "/dst".into() }),
        Body::StartRound(_) => Body::StartRoundReply(w::StartRoundReply {}),
        Body::EndRound(_) => Body::EndRoundReply(w::EndRoundReply::default()),
        Body::FsRoundDone(_) => Body::FsRoundReply(w::FsRoundReply::default()),
        Body::Files(_) => Body::FilesReply(w::FilesReply { bytes: 0 }),
        Body::Restore(_) => Body::RestoreReply(w::RestoreReply { pid, stats: None, restore_wall_us: 1, held: true }),
        Body::Commit(_) => Body::Committed(w::Committed { pid, resume_wall_us: 1, stats: None }),
        Body::Finish(_) => Body::FinishReply(w::FinishReply::default()),
        _ => Body::Failure(w::Failure { message: "unexpected".into(), criu_errors: Vec::new(), aborted: false }),
    })
}

fn fail(message: &str, aborted: bool) -> Body {
    Body::Failure(w::Failure { message: message.into(), criu_errors: Vec::new(), aborted })
}

/// The scripted destination: logs every message (`dst NAME`) and answers with `script` (or the default).
fn fake_destination(
    mut ch: Channel,
    log: FakeCriu,
    restored: i32,
    mut script: impl FnMut(&Body) -> Option<Act> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        let Ok(b) = wire::recv(&mut ch) else { return };
        let name = match &b {
            Body::Finish(f) => format!("dst Finish({})", f.migrated),
            other => format!("dst {}", wire::body_name(other)),
        };
        log.note(name);
        let act = script(&b).unwrap_or_else(|| default_reply(&b, restored));
        match act {
            Act::Reply(r) => {
                if wire::send(&mut ch, r).is_err() {
                    return;
                }
            }
            Act::Later(d, r) => {
                std::thread::sleep(d);
                let _ = wire::send(&mut ch, r);
            }
            Act::Then(a, b) => {
                let _ = wire::send(&mut ch, a);
                std::thread::sleep(Duration::from_millis(20));
                let _ = wire::send(&mut ch, b);
            }
            Act::Close => return,
        }
        if matches!(b, Body::Finish(_)) {
            return;
        }
    })
}

struct SourceTest {
    key: String,
    log: FakeCriu,
    dir: tempfile::TempDir,
    _workload: Sleeper,
    restored: Sleeper,
}

impl SourceTest {
    fn new(key: &str) -> SourceTest {
        let workload = Sleeper::new();
        let log = FakeCriu::new();
        logs().lock().unwrap_or_else(|p| p.into_inner()).insert(key.into(), (workload.pid(), log.clone()));
        SourceTest {
            key: key.into(),
            log,
            dir: tempfile::tempdir().expect("tempdir"),
            _workload: workload,
            restored: Sleeper::new(),
        }
    }

    fn cfg(&self) -> SourceConfig {
        SourceConfig {
            htype: "fake".into(),
            id: self.key.clone(),
            htype_options: Vec::new(),
            fs: None,
            fs_options: Vec::new(),
            pre_dump: PreDump::Off,
            policy: Policy::default_downtime(),
            on_no_converge: OnNoConverge::StopAndCopy,
            post_copy_after: None,
            lazy: false,
            lazy_restore: false,
            restart: false,
            handover: HandoverOrder::Overlap,
            keep_images: true,
            img_path: self.dir.path().join("img"),
            state_dir: self.dir.path().join("state"),
            skip_cpu_check: true,
            skip_criu_check: false,
            skip_space_check: false,
            timeout: Duration::from_secs(10),
            max_frozen: Duration::from_secs(2),
            resolve_timeout: Duration::from_secs(1),
            link_timeout: 3,
            progress: false,
            status: None,
            dst_rpid: None,
        }
    }

    /// Runs the source against the scripted destination; returns the outcome and the log.
    fn run(
        &self,
        cfg: SourceConfig,
        script: impl FnMut(&Body) -> Option<Act> + Send + 'static,
    ) -> (Ended, Result<(), String>, super::Report, Vec<String>) {
        let (rpc, peer) = pair();
        let (mem, _mem_peer) = pair();
        let dst = fake_destination(peer, self.log.clone(), self.restored.pid(), script);
        let ctx = SourceContext {
            drivers: &FakeDrivers,
            criu: &self.log,
            keeper: Box::new(RecordingKeeper(self.log.clone())),
            guards: None,
        };
        let (report, ended, r) = migrate(ctx, &cfg, SourceChannels::Given { rpc, mem, fs: None });
        let _ = dst.join();
        (ended, r.map_err(|e| e.to_string()), report, self.log.log())
    }

    fn journal(&self, session: &str) -> SourceJournal {
        Journals::open(&self.dir.path().join("state")).expect("journals").read(session).expect("read").expect("some")
    }
}

/// Keeps the lines of interest, in order.
fn steps(log: &[String]) -> Vec<String> {
    log.iter().filter(|l| !l.starts_with("criu preflight")).cloned().collect()
}

fn assert_order(log: &[String], want: &[&str]) {
    let mut i = 0;
    for l in log {
        if i < want.len() && l == want[i] {
            i += 1;
        }
    }
    assert_eq!(i, want.len(), "expected {:?} in this order in {:#?}", want, log);
}

fn post_dump() -> Script {
    Script::Notify { scripts: vec!["post-dump"], pid: None }
}

#[test]
fn stop_and_copy_commits_before_the_source_copy_ends() {
    let t = SourceTest::new("ok");
    t.log.script("DUMP", post_dump());
    let (ended, r, report, log) = t.run(t.cfg(), |_| None);
    assert_eq!(ended, Ended::Migrated, "{r:?}");
    assert_order(
        &steps(&log),
        &[
            "dst Hello",
            "dst Setup",
            "dst StartRound",
            "criu DUMP",
            "hold engage",
            "dst EndRound",
            "dst Restore",
            "dst Commit",
            "notify post-dump -> ok",
            "hold end (CRIU killed it)",
            "htype finish migrated",
            "dst Finish(true)",
        ],
    );
    assert!(report.handover.as_ref().is_some_and(|h| h.committed && h.commit_rtt_ms.is_some()));
    assert_eq!(t.journal(&report.session).state, SourceState::Migrated);
}

#[test]
fn a_failed_restore_resumes_the_source_and_nothing_is_committed() {
    let t = SourceTest::new("rstfail");
    t.log.script("DUMP", post_dump());
    let (ended, r, report, log) = t.run(t.cfg(), |b| match b {
        Body::Restore(_) => Some(Act::Reply(fail("CRIU RESTORE failed: no such file", true))),
        _ => None,
    });
    assert_eq!(ended, Ended::RolledBack);
    assert!(r.as_ref().err().is_some_and(|e| e.contains("no such file")), "{r:?}");
    assert!(!log.iter().any(|l| l == "dst Commit"), "{log:#?}");
    assert_order(&steps(&log), &["hold engage", "dst Restore", "notify post-dump -> failed", "hold resume (Resumed)"]);
    assert!(!report.handover.as_ref().is_some_and(|h| h.committed));
    assert_eq!(t.journal(&report.session).state, SourceState::RolledBack);
}

#[test]
fn a_destination_that_discards_its_copy_at_commit_lets_the_source_resume() {
    let t = SourceTest::new("commitfail");
    t.log.script("DUMP", post_dump());
    let (ended, _r, report, log) = t.run(t.cfg(), |b| match b {
        Body::Commit(_) => Some(Act::Reply(fail("the restored tree could not be resumed", true))),
        _ => None,
    });
    assert_eq!(ended, Ended::RolledBack);
    assert_order(&steps(&log), &["dst Commit", "notify post-dump -> failed", "hold resume (Resumed)"]);
    assert!(report.handover.as_ref().is_some_and(|h| h.committed), "the commit was sent");
}

#[test]
fn no_answer_to_commit_keeps_the_source_copy_frozen_in_doubt() {
    let t = SourceTest::new("doubt");
    t.log.script("DUMP", post_dump());
    let (ended, r, report, log) = t.run(t.cfg(), |b| match b {
        Body::Commit(_) => Some(Act::Close),
        _ => None,
    });
    assert_eq!(ended, Ended::InDoubt, "{r:?}");
    let e = r.expect_err("in doubt is an error");
    assert!(e.contains("phaul resolve"), "{e}");
    assert!(e.contains("kept frozen"), "{e}");
    // Neither resumed nor ended: CRIU was told to let go (post-dump failed) and phaul's hold keeps it frozen.
    assert!(!log.iter().any(|l| l.starts_with("hold resume") || l.starts_with("hold end")), "{log:#?}");
    assert_eq!(t.journal(&report.session).state, SourceState::InDoubt);
    assert_eq!(report.outcome, "in-doubt");
}

#[test]
fn criu_dying_after_the_commit_leaves_the_kill_to_phaul() {
    let t = SourceTest::new("criudies");
    t.log.script("DUMP", Script::Die { after: Some("post-dump") });
    let (ended, r, _report, log) = t.run(t.cfg(), |_| None);
    assert_eq!(ended, Ended::Migrated, "{r:?}");
    assert_order(
        &steps(&log),
        &["dst Commit", "notify post-dump -> ok", "criu died in DUMP", "hold end (phaul kills it)"],
    );
}

#[test]
fn a_slow_restore_is_cut_at_max_frozen_and_the_source_resumes() {
    let t = SourceTest::new("slow");
    t.log.script("DUMP", post_dump());
    let mut cfg = t.cfg();
    cfg.max_frozen = Duration::from_secs(1);
    let pid = t.restored.pid();
    let (ended, r, _report, log) = t.run(cfg, move |b| match b {
        Body::Restore(_) => Some(Act::Later(
            Duration::from_millis(2500),
            Body::RestoreReply(w::RestoreReply { pid, stats: None, restore_wall_us: 1, held: true }),
        )),
        _ => None,
    });
    assert_eq!(ended, Ended::RolledBack);
    let e = r.expect_err("aborted");
    assert!(e.contains("--max-frozen"), "{e}");
    assert!(!log.iter().any(|l| l == "dst Commit"), "{log:#?}");
    assert!(log.iter().any(|l| l == "hold resume (Resumed)"), "{log:#?}");
}

#[test]
fn a_failed_dump_resumes_nothing_phaul_held_and_names_the_destination_reason() {
    let t = SourceTest::new("dumpfail");
    t.log.script("DUMP", Script::Fail("Can't write pages: broken pipe".into()));
    let (ended, r, _report, log) = t.run(t.cfg(), |b| match b {
        // The destination's page server dies of a full disk while the source dumps: it says so unasked.
        Body::StartRound(_) => Some(Act::Then(
            Body::StartRoundReply(w::StartRoundReply {}),
            fail("the destination's disk is full at /var/lib/phaul/images", true),
        )),
        _ => None,
    });
    assert_eq!(ended, Ended::RolledBack);
    let e = r.expect_err("failed");
    assert!(e.contains("disk is full"), "{e}");
    assert!(!log.iter().any(|l| l.starts_with("hold")), "{log:#?}");
}

// ---- the destination

struct DestinationTest {
    log: FakeCriu,
    dir: tempfile::TempDir,
    restored: Sleeper,
}

impl DestinationTest {
    fn new() -> DestinationTest {
        DestinationTest { log: FakeCriu::new(), dir: tempfile::tempdir().expect("tempdir"), restored: Sleeper::new() }
    }

    fn cfg(&self) -> DestinationConfig {
        DestinationConfig {
            img_path: self.dir.path().join("img"),
            dst_rpid: None,
            timeout: Duration::from_secs(5),
            state_dir: self.dir.path().join("state"),
            reconnect_window: Duration::from_secs(1),
            link_timeout: 3,
            max_sessions: 4,
            rpid_dir: None,
            htype_options: Vec::new(),
            fs_options: Vec::new(),
            notify_helper: None,
        }
    }

    /// Serves a session whose source sends `msgs` in order (each waits for its answer), collecting the answers.
    fn serve(&self, msgs: Vec<Body>, then_close: bool) -> (Vec<Body>, DestinationJournal) {
        let cfg = self.cfg();
        let criu: Arc<dyn CriuBackend> = Arc::new(self.log.clone());
        let (rpc, mut src) = pair();
        let (mem, _m) = pair();
        let session = "0123456789abcdef0123456789abcdef".to_string();
        let t = std::thread::spawn(move || {
            let mut answers = Vec::new();
            for m in msgs {
                if wire::send(&mut src, m).is_err() {
                    break;
                }
                let _ = src.set_read_timeout(Duration::from_secs(10));
                match wire::recv(&mut src) {
                    Ok(b) => answers.push(b),
                    Err(_) => break,
                }
            }
            if !then_close {
                // Keep the connection until the destination ends.
                let _ = wire::recv(&mut src).map(|b| answers.push(b));
            }
            answers
        });
        let ctx = DestinationContext { drivers: &FakeDrivers, criu, cfg: &cfg };
        let _ = serve_session(&ctx, rpc, None, DestinationChannels::Given { mem, fs: None });
        let answers = t.join().expect("source thread");
        let j: DestinationJournal =
            Journals::open(&cfg.state_dir).expect("journals").read(&session).expect("read").unwrap_or_else(|| {
                DestinationJournal {
                    session,
                    state: DestinationState::Aborted,
                    htype: String::new(),
                    id: String::new(),
                    image_dir: PathBuf::new(),
                    restored: None,
                    criu_pid: None,
                    peer: None,
                    restart: false,
                    note: "no journal".into(),
                    updated_unix_ms: 0,
                }
            });
        (answers, j)
    }
}

fn hello() -> Body {
    Body::Hello(w::Hello {
        protocol_version: PROTOCOL_VERSION,
        phaul_version: "test".into(),
        criu: Some(w::CriuVersion { major: 4, minor: 2, sublevel: 1, text: "4.2.1".into() }),
        session: "0123456789abcdef0123456789abcdef".into(),
        skip_criu_check: false,
        timeout_ms: 0,
    })
}

fn setup() -> Body {
    Body::Setup(w::Setup {
        htype: "fake".into(),
        id: "dst".into(),
        mode: w::Mode::Live as i32,
        fs_driver: "fakefs".into(),
        max_frozen_ms: 3000,
        handover: w::Handover::Overlap as i32,
        ..Default::default()
    })
}

fn restore() -> Body {
    Body::Restore(w::Restore { round: 1, lazy: false })
}

fn start_round() -> Body {
    Body::StartRound(w::StartRound { round: 1, r#final: true, lazy: false, pages_as_files: true })
}

#[test]
fn a_message_that_does_not_fit_names_itself_and_the_state() {
    let t = DestinationTest::new();
    let (answers, _) = t.serve(vec![hello(), Body::Commit(w::Commit {})], true);
    match answers.get(1) {
        Some(Body::Failure(f)) => {
            assert!(f.message.contains("Commit") && f.message.contains("greeted"), "{}", f.message);
            assert!(f.aborted, "before a copy is held a misfit ends the session");
        }
        other => panic!("got {other:?}"),
    }
}

#[test]
fn the_held_copy_runs_only_after_commit() {
    let t = DestinationTest::new();
    t.log.script("RESTORE", Script::Notify { scripts: vec!["post-restore"], pid: Some(t.restored.pid()) });
    let (answers, j) = t.serve(
        vec![
            hello(),
            setup(),
            start_round(),
            restore(),
            Body::Commit(w::Commit {}),
            Body::Finish(w::Finish { migrated: true, reason: String::new() }),
        ],
        true,
    );
    assert!(
        matches!(answers.get(3), Some(Body::RestoreReply(r)) if r.held && r.pid == t.restored.pid()),
        "{answers:?}"
    );
    assert!(matches!(answers.get(4), Some(Body::Committed(c)) if c.pid == t.restored.pid()), "{answers:?}");
    assert_order(&t.log.log(), &["criu RESTORE", "notify post-restore -> ok"]);
    assert_eq!(j.state, DestinationState::Committed);
}

#[test]
fn finish_false_while_held_discards_the_copy() {
    let t = DestinationTest::new();
    t.log.script("RESTORE", Script::Notify { scripts: vec!["post-restore"], pid: Some(t.restored.pid()) });
    let (answers, j) = t.serve(
        vec![
            hello(),
            setup(),
            start_round(),
            restore(),
            Body::Finish(w::Finish { migrated: false, reason: "x".into() }),
        ],
        true,
    );
    assert!(matches!(answers.get(4), Some(Body::FinishReply(_))), "{answers:?}");
    assert_order(&t.log.log(), &["criu RESTORE", "notify post-restore -> failed"]);
    assert_eq!(j.state, DestinationState::Aborted);
}

#[test]
fn a_lost_control_channel_while_held_discards_the_copy() {
    let t = DestinationTest::new();
    t.log.script("RESTORE", Script::Notify { scripts: vec!["post-restore"], pid: Some(t.restored.pid()) });
    let (_answers, j) = t.serve(vec![hello(), setup(), start_round(), restore()], true);
    assert_order(&t.log.log(), &["criu RESTORE", "notify post-restore -> failed"]);
    assert_eq!(j.state, DestinationState::Aborted);
}

#[test]
fn a_restore_without_a_pid_is_an_error_not_pid_zero() {
    let t = DestinationTest::new();
    t.log.script("RESTORE", Script::Notify { scripts: vec!["post-restore"], pid: None });
    let (answers, j) = t.serve(vec![hello(), setup(), start_round(), restore()], true);
    match answers.get(3) {
        Some(Body::Failure(f)) => assert!(f.message.contains("no restored pid"), "{}", f.message),
        other => panic!("got {other:?}"),
    }
    assert_eq!(j.state, DestinationState::Aborted);
}
