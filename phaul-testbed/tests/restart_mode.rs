//! Restart mode (`--mode restart`): the filesystem moves, the workload is stopped on A and started on B, and
//! every failure before the start leaves it running on A again.
//!
//! The host type is the `cmd` test fixture (phaul-testbed/fixtures/plugin-restartable): a real shell process
//! stopped with signals and started with `sh -c`, standing in for a container manager's stop and start while no
//! LXC or Virtuozzo host type is built here. The workload is a counter that keeps its count in a file, so that
//! "it went on from where it was" is seen through the filesystem, the only state restart mode moves.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use phaul_testbed::fault::{kill_at, wait_until, Side};
use phaul_testbed::{
    pid_alive, pids_in_netns, reap_pid, wait_pid_gone, write_plugins_toml, Lab, MigrateOptions, MigrationRun,
};
use serde_json::Value;

/// A lab whose plugin list has the `cmd` fixture (using the `shared` filesystem driver: both hosts see the
/// same state directory, as with shared storage).
fn restart_lab(tag: &str) -> (Lab, PathBuf) {
    let lab = lab(tag);
    let plugins = lab.path("plugins-cmd.toml");
    write_plugins_toml(&plugins, &["cmd", "shared"]).expect("plugins.toml");
    (lab, plugins)
}

fn options(w: &CmdWorkload, plugins: &Path) -> MigrateOptions {
    MigrateOptions {
        target: Some(("cmd".into(), "counter".into())),
        src_args: vec!["--mode".into(), "restart".into(), "--htype-opt".into(), w.opt()],
        src_plugins: Some(plugins.to_path_buf()),
        dst_plugins: Some(plugins.to_path_buf()),
        ..Default::default()
    }
}

fn report(run: &MigrationRun) -> Value {
    run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()))
}

fn assert_nothing_in_b(lab: &Lab, run: &MigrationRun) {
    let b = lab.b().netns_inode().expect("netns of B");
    assert!(
        wait_until(Duration::from_secs(15), || pids_in_netns(b).is_ok_and(|l| l.is_empty())),
        "processes left in host B: {:?}\n{}",
        pids_in_netns(b),
        run.describe()
    );
}

/// The source journal of the one session in `lab`.
fn source_journal(lab: &Lab) -> Value {
    let dir = lab.path("src-state");
    let file = std::fs::read_dir(&dir)
        .expect("src-state")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".source.json"))
        .unwrap_or_else(|| panic!("no source journal in {}", dir.display()));
    serde_json::from_str(&std::fs::read_to_string(&file).expect("journal")).expect("journal JSON")
}

#[test]
fn restart_mode_moves_the_workload_and_its_files() {
    let (lab, plugins) = restart_lab("restart-ok");
    let mut w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let run = lab.migrate(old, options(&w, &plugins)).expect("run");
    assert!(run.succeeded(), "restart-mode migration failed:\n{}", run.describe());
    assert!(wait_pid_gone(old, Duration::from_secs(10)), "the workload still runs on A as {old}");
    let new = w.wait_new_pid(old, Duration::from_secs(5)).unwrap_or_else(|| panic!("no new pid:\n{}", run.describe()));
    w.assert_counts_in(new, lab.b().netns_inode().expect("netns of B"), before, "in host B");
    assert!(pids_in_netns(lab.a().netns_inode().expect("netns of A")).expect("pids in A").is_empty());

    let r = report(&run);
    assert_eq!(r["outcome"], "migrated", "{r}");
    assert_eq!(r["mode"], "restart", "{r}");
    assert_eq!(r["restored_pid"], new, "{r}");
    let outage = r["outage_ms"].as_f64().unwrap_or_else(|| panic!("no outage_ms: {r}"));
    assert!(outage > 0.0, "{r}");
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("no fs_round_list: {r}"));
    assert!(rounds.len() >= 2, "a live round and the final one: {r}");
    assert_eq!(rounds.last().map(|x| x["frozen"].clone()), Some(Value::Bool(true)), "{r}");
    assert!(rounds[..rounds.len() - 1].iter().all(|x| x["frozen"] == false), "{r}");
    assert_eq!(source_journal(&lab)["state"], "migrated");
}

#[test]
fn a_destination_that_cannot_start_it_leaves_it_running_on_the_source() {
    let (lab, plugins) = restart_lab("restart-nostart");
    let mut w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let mut opts = options(&w, &plugins);
    opts.dst_args = vec!["--htype-opt".into(), "cmd:fail-start=1".into()];
    let run = lab.migrate(old, opts).expect("run");
    assert!(!run.src_status.success(), "the source reported success:\n{}", run.describe());
    assert!(run.src_stderr.contains("start failed on purpose"), "{}", run.describe());
    let r = report(&run);
    assert_eq!(r["outcome"], "failed", "{r}");
    // Stopped for the final round, then started again here.
    let new = w
        .wait_new_pid(old, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("not started again:\n{}", run.describe()));
    assert!(!pid_alive(old));
    w.assert_counts_in(new, lab.a().netns_inode().expect("netns of A"), before, "in host A");
    assert_nothing_in_b(&lab, &run);
    assert_eq!(source_journal(&lab)["state"], "rolled-back");
}

#[test]
fn a_source_that_cannot_stop_it_leaves_it_running_untouched() {
    let (lab, plugins) = restart_lab("restart-nostop");
    let w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let mut opts = options(&w, &plugins);
    opts.src_args.extend(["--htype-opt".into(), "fail-stop=1".into()]);
    let run = lab.migrate(old, opts).expect("run");
    assert!(!run.src_status.success(), "the source reported success:\n{}", run.describe());
    assert!(run.src_stderr.contains("stop failed on purpose"), "{}", run.describe());
    assert_eq!(w.pid(), Some(old), "the workload was restarted although it never stopped");
    w.assert_counts_in(old, lab.a().netns_inode().expect("netns of A"), before, "in host A");
    assert_nothing_in_b(&lab, &run);
}

#[test]
fn a_source_killed_while_the_workload_is_stopped_has_its_guard_start_it_again() {
    let (lab, plugins) = restart_lab("restart-killsrc");
    let mut w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let mut opts = options(&w, &plugins);
    kill_at(&mut opts, "src:step:stopped", Side::Src, lab.path("fault.json"));
    let run = lab.migrate(old, opts).expect("run");
    assert!(lab.path("fault.json").exists(), "src:step:stopped was never reached:\n{}", run.describe());
    assert!(!run.src_status.success(), "{}", run.describe());
    // The guard notices phaul migrate's death and starts the stopped workload again on A.
    let new = w
        .wait_new_pid(old, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guard did not start it:\n{}", run.describe()));
    w.assert_counts_in(new, lab.a().netns_inode().expect("netns of A"), before, "in host A");
    assert_nothing_in_b(&lab, &run);
    let deadline = Instant::now() + Duration::from_secs(30);
    while source_journal(&lab)["state"] != "rolled-back" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(source_journal(&lab)["state"], "rolled-back", "{}", source_journal(&lab));
    if let Some(g) = source_journal(&lab)["guard_pid"].as_i64() {
        assert!(wait_pid_gone(g as i32, Duration::from_secs(30)), "the guard {g} never exited");
        let _ = reap_pid(g as i32, Duration::from_millis(200));
    }
}

#[test]
fn a_destination_killed_at_the_start_leaves_the_session_in_doubt_until_the_operator_decides() {
    let (lab, plugins) = restart_lab("restart-killdst");
    let mut w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let mut opts = options(&w, &plugins);
    kill_at(&mut opts, "dst:step:starting", Side::Dst, lab.path("fault.json"));
    let run = lab.migrate(old, opts).expect("run");
    assert!(lab.path("fault.json").exists(), "dst:step:starting was never reached:\n{}", run.describe());
    // The source sent Start and heard nothing: the destination may have started it, so phaul neither starts it
    // here nor calls it migrated.
    assert_eq!(run.src_status.code(), Some(3), "expected in doubt (exit 3):\n{}", run.describe());
    assert!(!pid_alive(old), "the workload runs on A although its start on B is in doubt");
    assert_eq!(w.pid(), Some(old), "something started the workload while the session was in doubt");
    let session = source_journal(&lab)["session"].as_str().expect("session").to_string();
    assert_eq!(source_journal(&lab)["state"], "in-doubt");

    // The operator saw that nothing runs on B and decides for the source.
    let plugins_s = plugins.display().to_string();
    let out = lab.phaul(&["--plugins", &plugins_s, "resolve", &session, "--force", "resume"], &[]).expect("resolve");
    assert!(out.status.success(), "phaul resolve --force resume failed:\n{}\n{}", out.stdout, out.stderr);
    let new =
        w.wait_new_pid(old, Duration::from_secs(10)).unwrap_or_else(|| panic!("not started again: {}", out.stdout));
    w.assert_counts_in(new, lab.a().netns_inode().expect("netns of A"), before, "in host A");
    assert_nothing_in_b(&lab, &run);
    assert_eq!(source_journal(&lab)["state"], "rolled-back");
}

/// `slowfs` (the fixture library's filesystem driver) with rounds of `ms` on each side, under `--timeout 2`.
fn slow_options(w: &CmdWorkload, plugins: &Path, ms: u32, silent: bool) -> MigrateOptions {
    let mut opts = options(w, plugins);
    opts.src_args.extend(["--fs".into(), "slowfs".into(), "--fs-opt".into(), format!("delay-ms={ms}")]);
    opts.src_args.extend(["--timeout".into(), "2".into()]);
    opts.dst_args = vec!["--timeout".into(), "2".into(), "--fs-opt".into(), format!("slowfs:recv-delay-ms={ms}")];
    if silent {
        opts.src_args.extend(["--fs-opt".into(), "silent=1".into()]);
        opts.dst_args.extend(["--fs-opt".into(), "slowfs:silent=1".into()]);
    }
    opts
}

#[test]
fn filesystem_rounds_longer_than_the_timeout_go_on_while_their_drivers_report_progress() {
    let (lab, plugins) = restart_lab("restart-slowfs");
    let mut w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let run = lab.migrate(old, slow_options(&w, &plugins, 4500, false)).expect("run");
    assert!(run.succeeded(), "rounds of 4.5 s under --timeout 2 failed:\n{}", run.describe());
    let r = report(&run);
    let rounds = r["fs_round_list"].as_array().cloned().unwrap_or_default();
    assert!(rounds.len() >= 2, "{r}");
    for x in &rounds {
        assert!(x["duration_ms"].as_f64().is_some_and(|d| d >= 4500.0), "a round shorter than its driver's: {r}");
    }
    let new = w.wait_new_pid(old, Duration::from_secs(5)).unwrap_or_else(|| panic!("no new pid:\n{}", run.describe()));
    w.assert_counts_in(new, lab.b().netns_inode().expect("netns of B"), before, "in host B");
}

#[test]
fn a_filesystem_round_that_reports_no_progress_is_bounded_by_the_timeout() {
    let (lab, plugins) = restart_lab("restart-slowfs-silent");
    let w = CmdWorkload::start(&lab, "counter");
    let old = w.pids[0];
    let before = w.count();
    let run = lab.migrate(old, slow_options(&w, &plugins, 6000, true)).expect("run");
    assert!(!run.src_status.success(), "a silent 6 s round under --timeout 2 passed:\n{}", run.describe());
    assert!(run.src_stderr.contains("--timeout"), "the error does not name the bound:\n{}", run.describe());
    // The first round runs before anything stops: the workload never left A.
    assert_eq!(w.pid(), Some(old));
    w.assert_counts_in(old, lab.a().netns_inode().expect("netns of A"), before, "in host A");
    assert_nothing_in_b(&lab, &run);
}
