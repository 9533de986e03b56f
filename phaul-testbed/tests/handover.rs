//! The handover under conditions that broke it before: state CRIU drains at dump time, a destination whose disk
//! fills, shared storage with locks, sockets and databases. Real CRIU, real namespaces, real workloads.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use phaul_testbed::{pid_alive, pids_in_netns, MigrateOptions};
use phaul_workloads::heartbeat::check_log;

/// Mounts a small tmpfs over a directory for the test's lifetime.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "phaul-test", &dir.display().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn report_str<'a>(r: &'a serde_json::Value, path: &[&str]) -> &'a str {
    let mut v = r;
    for p in path {
        v = &v[*p];
    }
    v.as_str().unwrap_or_default()
}

/// No freezer cgroup, no CRIU and nothing of the workload left behind on the destination.
fn assert_nothing_left(lab: &phaul_testbed::Lab) {
    let b = lab.b().netns_inode().expect("netns B");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = pids_in_netns(b).expect("pids in B");
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left in host B: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mount = phaul_core::hold::freezer::cgroup2_mount().expect("cgroup2");
    let session_cgroups: Vec<_> = std::fs::read_dir(&mount)
        .expect("cgroup2")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("phaul-"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs")).map(|p| !p.trim().is_empty()).unwrap_or(false)
        })
        .map(|e| e.path())
        .collect();
    assert!(session_cgroups.is_empty(), "freezer cgroups still holding processes: {session_cgroups:?}");
}

/// CRIU drains pty queues at dump time and puts them back only when the dump itself fails. A migration that
/// fails after the freeze (on one kernel the restore collides with the frozen source's pty index) resumes the
/// workload, and phaul writes the drained bytes back before it thaws it: the queues are as they were.
#[test]
fn pty_data_queued_at_the_freeze_is_back_after_a_roll_back() {
    let lab = lab("ptyroll");
    let w = lab.start_workload("pty-queue", &["--to-slave-bytes", "1500", "--to-master-bytes", "900"]).expect("start");
    let before = probe_ok(&w, w.pid());
    assert_eq!(before["queued_to_slave"], 1500, "{before}");
    let run = lab.migrate(w.pid(), MigrateOptions::default()).expect("run");
    assert_still_on_source(&lab, &w, &run);
    let report = run.report.clone().expect("report");
    assert!(report_str(&report, &["error"]).contains("RESTORE"), "{}", run.describe());
    // The restore happened inside the freeze, so CRIU had drained the queues: they are back, byte for byte.
    let after = probe_ok(&w, w.pid());
    assert_eq!(after["queued_to_slave"], 1500, "{after}");
    assert_eq!(after["queued_to_master"], 900, "{after}");
    assert_eq!(after["contents_match"], true, "{after}");
    assert_nothing_left(&lab);
}

/// The destination's image directory fills up while pages stream in: its page server dies, it aborts the session
/// at once, the source's dump fails within seconds (not at --timeout), the error names the full disk, and the
/// workload runs on.
#[test]
fn a_full_destination_disk_is_noticed_in_seconds_and_named() {
    let lab = lab("fulldisk");
    let _disk = SmallDisk::mount(&lab.path("dst-images"), "8m");
    let hb = lab.path("hb.log");
    let w =
        lab.start_workload("memory", &["--size-mib", "64", "--heartbeat", &hb.display().to_string()]).expect("start");
    let before = probe_ok(&w, w.pid());
    let t = Instant::now();
    let run = lab
        .migrate(
            w.pid(),
            MigrateOptions {
                src_args: vec!["--max-frozen".into(), "30".into(), "--timeout".into(), "120".into()],
                ..Default::default()
            },
        )
        .expect("run");
    let took = t.elapsed();
    assert_still_on_source(&lab, &w, &run);
    let err = report_str(run.report.as_ref().expect("report"), &["error"]).to_string();
    assert!(err.contains("disk is full"), "{err}\n{}", run.describe());
    assert!(err.contains("dst-images"), "the path is named: {err}");
    assert!(took < Duration::from_secs(25), "noticed after {took:?}, not in seconds");
    assert_eq!(probe_ok(&w, w.pid())["actual_checksum"], before["expected_checksum"]);
    // Let a few beats more land, then check the freeze: well under the 30 s bound.
    std::thread::sleep(Duration::from_millis(300));
    let hb_text = std::fs::read_to_string(&hb).expect("heartbeat");
    let s = check_log(&hb_text).expect("one host, beats increase");
    assert!(s.max_gap_ms < 15_000, "frozen for {} ms", s.max_gap_ms);
    assert_nothing_left(&lab);
}

/// A workload holding a POSIX lock and a flock on storage both hosts share: beside its frozen self a restore would
/// wait for those locks. phaul picks the sequential handover (its tree ends before the destination restores) and
/// says why; the locks are held by the restored copy on B.
#[test]
fn locks_on_shared_storage_migrate_by_the_sequential_handover() {
    let lab = lab("locks");
    let file = lab.path("locked.db");
    std::fs::write(&file, b"data").expect("file");
    let mut w = lab.start_workload("lock-holder", &["--file", &file.display().to_string()]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    let report = m.run.report.as_ref().expect("report");
    assert_eq!(report_str(report, &["handover", "order"]), "sequential", "{report}");
    assert!(report_str(report, &["handover", "order_reason"]).contains("lock"), "{report}");
    assert_eq!(m.after["posix_lock_held"], true, "{}", m.after);
    assert_eq!(m.after["flock_held"], true, "{}", m.after);
}

/// With such locks, `--handover overlap` is refused before anything is frozen, naming what the tree holds.
#[test]
fn overlap_with_locks_on_shared_storage_is_refused_before_the_freeze() {
    let lab = lab("lockover");
    let file = lab.path("locked.db");
    std::fs::write(&file, b"data").expect("file");
    let hb = lab.path("hb.log");
    let w = lab
        .start_workload(
            "lock-holder",
            &["--file", &file.display().to_string(), "--heartbeat", &hb.display().to_string()],
        )
        .expect("start");
    let run = lab
        .migrate(
            w.pid(),
            MigrateOptions { src_args: vec!["--handover".into(), "overlap".into()], ..Default::default() },
        )
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    let err = report_str(run.report.as_ref().expect("report"), &["error"]).to_string();
    assert!(err.contains("--handover sequential") && err.contains("lock"), "{err}");
    assert!(run.report.as_ref().expect("report")["rounds"].as_array().is_some_and(|r| r.is_empty()), "nothing dumped");
}

/// A real SQLite database in WAL mode on shared storage, written all the time: every row the writer acknowledged
/// is in the database after the migration, the database is sound, and only one host ever wrote (repeated, since
/// the old race showed in a few runs out of many).
#[test]
fn an_sqlite_writer_on_shared_storage_keeps_every_acknowledged_row() {
    let runs: usize = std::env::var("PHAUL_SQLITE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    for i in 0..runs {
        let lab = lab(&format!("sqlite{i}"));
        let db = lab.path("app.db");
        let acks = lab.path("acks.log");
        let hb = lab.path("hb.log");
        let mut w = lab
            .start_workload(
                "sqlite-writer",
                &[
                    "--db",
                    &db.display().to_string(),
                    "--ack-log",
                    &acks.display().to_string(),
                    "--heartbeat",
                    &hb.display().to_string(),
                ],
            )
            .expect("start");
        w.wait_state("some rows", Duration::from_secs(20), |s| s["acked"].as_u64() > Some(10)).expect("rows");
        let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
        let report = m.run.report.as_ref().expect("report");
        assert_eq!(report_str(report, &["handover", "order"]), "sequential", "{report}");
        w.wait_state("rows written on B", Duration::from_secs(20), |s| {
            s["host"] == "10.91.0.2" && s["acked"].as_u64() > m.after["acked"].as_u64().map(|a| a + 5)
        })
        .expect("the writer goes on on B");
        let restored = m.restored;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(restored), nix::sys::signal::Signal::SIGKILL);
        assert!(phaul_testbed::wait_pid_gone(restored, Duration::from_secs(10)));
        let ack_text = std::fs::read_to_string(&acks).expect("acks");
        let summary = phaul_workloads::kinds::sqlite_writer::check_acks(&db, &ack_text)
            .unwrap_or_else(|e| panic!("run {i}: an acknowledged row is missing or the database is unsound: {e}"));
        let hb_s = check_log(&std::fs::read_to_string(&hb).expect("hb")).unwrap_or_else(|e| panic!("run {i}: {e}"));
        assert_eq!(hb_s.addrs, vec!["10.91.0.1".to_string(), "10.91.0.2".to_string()], "run {i}");
        eprintln!("run {i}: {summary:?}, freeze {} ms", hb_s.max_gap_ms);
        assert!(!pid_alive(w.pid()));
    }
}
