//! The `external` filesystem driver with the sample caller (phaul-external-caller): the caller is asked to sync
//! once while the workload runs and once more while it is frozen; an error or "unsupported" answer aborts the
//! migration with the caller's message, and the workload keeps running on the source.

mod common;

use common::*;
use phaul_testbed::{locate_binary, MigrateOptions};

fn caller(args: &[&str]) -> Option<(std::path::PathBuf, Vec<String>)> {
    Some((locate_binary("phaul-external-caller").expect("caller"), args.iter().map(|s| s.to_string()).collect()))
}

#[test]
fn the_caller_syncs_twice_and_the_migration_succeeds() {
    let lab = lab("extok");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let log = lab.path("syncs.log");
    let sync = format!("echo \"$PHAUL_SYNC_ROUND $PHAUL_SYNC_FROZEN\" >> '{}'", log.display());
    let m = migrate_and_check(
        &lab,
        &mut w,
        MigrateOptions { src_wrapper: caller(&["--on-sync", &sync]), ..Default::default() },
    );
    // Round 1 while the workload ran, round 2 while it was frozen.
    assert_eq!(std::fs::read_to_string(&log).expect("sync log"), "1 0\n2 1\n");
    assert_eq!(m.run.report.expect("report")["fs_driver"], "external");
}

#[test]
fn a_caller_error_aborts_with_its_message() {
    let lab = lab("exterr");
    let w = lab.start_workload("counter", &[]).expect("start");
    let opts = MigrateOptions {
        src_wrapper: caller(&["--answer", "error", "--message", "the storage pool is full"]),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(
        run.src_stderr.contains("the caller could not sync the filesystem: the storage pool is full"),
        "{}",
        run.describe()
    );
}

#[test]
fn an_unsupported_answer_aborts() {
    let lab = lab("extunsup");
    let w = lab.start_workload("counter", &[]).expect("start");
    let run = lab
        .migrate(w.pid(), MigrateOptions { src_wrapper: caller(&["--answer", "unsupported"]), ..Default::default() })
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("does not support syncing the filesystem"), "{}", run.describe());
}

#[test]
fn a_failure_on_the_frozen_sync_resumes_the_workload() {
    let lab = lab("extfrozen");
    let w = lab.start_workload("counter", &[]).expect("start");
    // Succeed while running, fail once frozen: CRIU must resume the frozen tree.
    let sync = "[ \"$PHAUL_SYNC_FROZEN\" = 0 ]";
    let run = lab
        .migrate(w.pid(), MigrateOptions { src_wrapper: caller(&["--on-sync", sync]), ..Default::default() })
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("the sync command exited"), "{}", run.describe());
    let c = u64_of(&probe_ok(&w, w.pid()), "counter");
    w.wait_counter_above(c + 3, std::time::Duration::from_secs(10)).expect("the resumed workload counts on");
}

#[test]
fn the_external_driver_needs_its_message_fd() {
    let lab = lab("extnofd");
    let w = lab.start_workload("counter", &[]).expect("start");
    let pid = w.pid().to_string();
    // Connected channels whose peer never answers: the option is checked before anything is sent.
    let (rpc, _rpc_peer) = std::os::unix::net::UnixStream::pair().expect("pair");
    let (mem, _mem_peer) = std::os::unix::net::UnixStream::pair().expect("pair");
    let args = [
        "--plugins",
        &lab.plugins.display().to_string(),
        "migrate",
        "pid",
        &pid,
        "--fdrpc",
        "3",
        "--fdmem",
        "4",
        "--fs",
        "external",
    ];
    let out = lab.phaul(&args, &[(rpc.into(), 3), (mem.into(), 4)]).expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("pass --fs-opt msg-fd=N"), "{}", out.stderr);
    probe_ok(&w, w.pid());
}
