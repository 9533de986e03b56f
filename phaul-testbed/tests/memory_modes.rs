//! Memory-migration modes on this host's kernel, which has no soft-dirty tracking and on which CRIU's remote lazy
//! pages fail. (Pre-copy, post-copy and hybrid themselves are proven in the lab tier: lab/scenarios.)

mod common;

use common::*;
use phaul_testbed::MigrateOptions;

/// Without dirty-memory tracking phaul does stop-and-copy and says why in the report.
#[test]
fn without_memory_tracking_phaul_does_stop_and_copy_and_says_why() {
    let lab = lab("nosd");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    let r = m.run.report.expect("report");
    assert_eq!(r["memory"]["strategy"], "stop-and-copy", "{r}");
    assert!(r["memory"]["reason"].as_str().unwrap_or_default().contains("CONFIG_MEM_SOFT_DIRTY"), "{r}");
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["rounds"][0]["kind"], "dump", "{r}");
}

/// `--pre-dump on` where tracking is missing fails before anything is frozen.
#[test]
fn pre_dump_on_without_tracking_refuses_before_freezing() {
    let lab = lab("predumpon");
    let w = lab.start_workload("counter", &[]).expect("start");
    let run = lab
        .migrate(w.pid(), MigrateOptions { src_args: vec!["--pre-dump".into(), "on".into()], ..Default::default() })
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("pre-copy was requested with --pre-dump on"), "{}", run.describe());
}

/// Post-copy is refused where lazy pages do not work, found out by a trial on a throwaway process before the
/// workload is frozen: the workload never stops, and CRIU's own reason is in the message.
#[test]
fn post_copy_is_refused_before_freezing_where_lazy_pages_fail() {
    let lab = lab("lazyno");
    let w = lab.start_workload("memory", &["--size-mib", "64"]).expect("start");
    let before = probe_ok(&w, w.pid());
    let run = lab
        .migrate(w.pid(), MigrateOptions { src_args: vec!["--mode".into(), "lazy".into()], ..Default::default() })
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(
        run.src_stderr.contains("lazy pages (which post-copy and --lazy-restore need) do not work on this host"),
        "{}",
        run.describe()
    );
    assert!(run.src_stderr.contains("nothing was frozen"), "{}", run.describe());
    assert!(run.src_stderr.contains("Error ("), "CRIU's reason is missing:\n{}", run.describe());
    let r = run.report.expect("report");
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(0), "something was dumped: {r}");
    let after = probe_ok(&w, w.pid());
    assert_eq!(after["actual_checksum"], before["expected_checksum"]);
    // No trial process or CRIU is left behind.
    let leftovers = std::process::Command::new("pgrep").args(["-f", "sleep 600"]).output().expect("pgrep");
    assert!(leftovers.stdout.is_empty(), "trial processes left: {}", String::from_utf8_lossy(&leftovers.stdout));
}

/// `--lazy-restore` with pre-copy rounds is refused at once (CRIU's lazy-pages daemon cannot load pages from a
/// pre-copy round's images); with stop-and-copy, where lazy pages fail on the destination, the destination's trial
/// refuses it before anything is frozen.
#[test]
fn lazy_restore_is_refused_with_pre_copy_and_where_lazy_pages_fail() {
    let lab = lab("lazyrestore");
    let w = lab.start_workload("memory", &["--size-mib", "16"]).expect("start");
    let before = probe_ok(&w, w.pid());
    let run = lab
        .migrate(w.pid(), MigrateOptions { src_args: vec!["--lazy-restore".into()], ..Default::default() })
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(
        run.src_stderr.contains("--lazy-restore works with stop-and-copy only: add --pre-dump off"),
        "{}",
        run.describe()
    );

    let args = vec!["--lazy-restore".into(), "--pre-dump".into(), "off".into()];
    let run = lab.migrate(w.pid(), MigrateOptions { src_args: args, ..Default::default() }).expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("do not work on the destination"), "{}", run.describe());
    assert!(run.src_stderr.contains("nothing was frozen"), "{}", run.describe());
    let r = run.report.expect("report");
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(0), "something was dumped: {r}");
    let after = probe_ok(&w, w.pid());
    assert_eq!(after["actual_checksum"], before["expected_checksum"]);
}
