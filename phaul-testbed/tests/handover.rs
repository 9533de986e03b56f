//! The handover under conditions that broke it before: state CRIU drains at dump time, a destination whose disk
//! fills, shared storage with locks, sockets and databases. Real CRIU, real namespaces, real workloads.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use phaul_testbed::{pid_alive, pids_in_netns, MigrateOptions};
use phaul_workloads::heartbeat::check_log;

fn report_str<'a>(r: &'a serde_json::Value, path: &[&str]) -> &'a str {
    let mut v = r;
    for p in path {
        v = &v[*p];
    }
    v.as_str().unwrap_or_default()
}

/// Nothing of the workload left behind on the destination, and no freezer cgroup of this session left holding
/// anything (other tests' sessions may be under way meanwhile).
fn assert_nothing_left(lab: &phaul_testbed::Lab, run: &phaul_testbed::MigrationRun) {
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
    let session = run.report.as_ref().map(|r| report_str(r, &["session"]).to_string()).unwrap_or_default();
    let mount = phaul_core::hold::freezer::cgroup2_mount().expect("cgroup2");
    let cg = mount.join(phaul_core::hold::hold_name(&session));
    let held = std::fs::read_to_string(cg.join("cgroup.procs")).map(|p| !p.trim().is_empty()).unwrap_or(false);
    assert!(!held, "the session's freezer cgroup {} still holds processes", cg.display());
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
    assert_nothing_left(&lab, &run);
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
                // Past the set-up's free-space check (which would refuse this at once), so that the disk fills
                // while the pages stream.
                src_args: vec![
                    "--max-frozen".into(),
                    "30".into(),
                    "--timeout".into(),
                    "120".into(),
                    "--skip-space-check".into(),
                ],
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
    assert_nothing_left(&lab, &run);
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

/// Waits (bounded) for a phaul process to stop at its fault point (`PHAUL_TEST_FAULT_FILE`), runs `action` with
/// the report line, then continues the process unless `action` returned false (it killed it).
fn at_fault_point(
    file: std::path::PathBuf,
    action: impl FnOnce(&serde_json::Value) -> bool + Send + 'static,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(v) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t.trim()).ok())
            {
                let pid = v["pid"].as_i64().unwrap_or(0) as i32;
                // Stopped for sure (the hook raises SIGSTOP right after writing).
                let stopped = Instant::now() + Duration::from_secs(5);
                while Instant::now() < stopped {
                    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    if st.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('T')).unwrap_or(false) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let go_on = action(&v);
                if go_on && pid > 0 {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT);
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
}

fn fault_env(point: &str, file: &std::path::Path) -> Vec<(String, String)> {
    vec![("PHAUL_TEST_FAULT_AT".into(), point.into()), ("PHAUL_TEST_FAULT_FILE".into(), file.display().to_string())]
}

fn run_in(host: &phaul_testbed::Host, args: &[&str]) {
    let out = host.run(args[0], &args[1..]).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A unix-socket server on shared storage (as tmux's) whose migration fails at the destination's restore: with the
/// sequential handover its tree had ended and its image set was the source's copy, so phaul restores it on the
/// source from that set, and the socket file is its own again (the old failure: the destination's restore had
/// unlinked the file, and the resumed source was unreachable).
#[test]
fn a_unix_socket_server_whose_migration_fails_is_restored_on_the_source_and_reachable() {
    let lab = lab("unixfail");
    let sock = lab.path("app.sock");
    let mut w = lab.start_workload("unix-server", &["--path", &sock.display().to_string()]).expect("start");
    probe_ok(&w, w.pid());
    let fault = lab.path("dst-fault.json");
    // The destination's phaul dies while CRIU holds the restored copy: CRIU kills that copy, nothing committed.
    let killer = at_fault_point(fault.clone(), |v| {
        let pid = v["pid"].as_i64().unwrap_or(0) as i32;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        false
    });
    let run = lab
        .migrate(
            w.pid(),
            MigrateOptions { dst_env: fault_env("dst:notify:post-restore", &fault), ..Default::default() },
        )
        .expect("run");
    assert!(killer.join().expect("killer"), "the destination never reached its hold:\n{}", run.describe());
    assert_eq!(run.src_status.code(), Some(1), "{}", run.describe());
    let report = run.report.clone().expect("report");
    assert_eq!(report_str(&report, &["handover", "order"]), "sequential", "{report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    let restored_here = report["source_pid"].as_i64().expect("source pid") as i32;
    assert_ne!(restored_here, w.pid(), "the workload was restored on the source from its images");
    w.adopt_pid(restored_here).expect("adopt");
    assert!(pid_alive(restored_here));
    assert_eq!(phaul_testbed::netns_of_pid(restored_here).expect("netns"), lab.a().netns_inode().expect("A"));
    // Its self-check connects through the socket file and must meet itself.
    let after = probe_ok(&w, restored_here);
    assert!(after["self_checks"].as_u64() > Some(0), "{after}");
    assert_nothing_left(&lab, &run);
}

/// A TCP server with clients connecting all through the migration (half-open ones are skipped and retried) and
/// clients holding established connections: it migrates, the established connections keep working, and new
/// clients are served on B. The service address moves with the workload: inside the freeze it leaves A, and B
/// drops its traffic until the restored server is there (a real floating address would be moved by the manager).
#[test]
fn a_server_accepting_connections_throughout_migrates() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let lab = lab("busy");
    run_in(lab.a(), &["ip", "addr", "add", "10.91.0.100/32", "dev", "lo"]);
    let mut w = lab.start_workload("busy-server", &["--listen", "10.91.0.100:7100"]).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    let migrated_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let new_ok_after = Arc::new(AtomicU64::new(0));
    let addr: std::net::SocketAddr = "10.91.0.100:7100".parse().expect("addr");
    // Clients with established connections, pinging all the time (a generous timeout covers the freeze).
    let mut holders = Vec::new();
    for c in 0..3 {
        let (stop, at) = (stop.clone(), migrated_at.clone());
        holders.push(
            lab.b()
                .in_netns(Duration::from_secs(5), move || {
                    std::thread::spawn(move || -> Result<(u64, u64), String> {
                        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                            .map_err(|e| e.to_string())?;
                        s.set_read_timeout(Some(Duration::from_secs(40))).map_err(|e| e.to_string())?;
                        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                        let (mut n, mut after) = (0u64, 0u64);
                        while !stop.load(Ordering::SeqCst) {
                            n += 1;
                            (&s).write_all(format!("ping {n}\n").as_bytes())
                                .map_err(|e| format!("client {c} ping {n}: {e}"))?;
                            let mut line = String::new();
                            r.read_line(&mut line).map_err(|e| format!("client {c} pong {n}: {e}"))?;
                            if !line.starts_with(&format!("pong {n} ")) {
                                return Err(format!("client {c}: {line:?} for ping {n}"));
                            }
                            if at.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                                after += 1;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Ok((n, after))
                    })
                })
                .expect("client"),
        );
    }
    // A client opening new connections all the time, retrying whatever fails.
    let connector = {
        let (stop, at, ok_after) = (stop.clone(), migrated_at.clone(), new_ok_after.clone());
        lab.b()
            .in_netns(Duration::from_secs(5), move || {
                std::thread::spawn(move || {
                    let mut tried = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        tried += 1;
                        let served = (|| -> std::io::Result<bool> {
                            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
                            s.set_read_timeout(Some(Duration::from_millis(500)))?;
                            (&s).write_all(b"ping 1\n")?;
                            let mut line = String::new();
                            BufReader::new(&s).read_line(&mut line)?;
                            Ok(line.starts_with("pong 1 "))
                        })();
                        if served.unwrap_or(false) && at.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                            ok_after.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    tried
                })
            })
            .expect("connector")
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = probe_ok(&w, w.pid());
    assert!(before["accepted"].as_u64() > Some(3), "{before}");
    // Inside the freeze: the address leaves A; B drops its traffic until the restored server is there.
    let fault = lab.path("src-fault.json");
    let (a_ns, b_ns) = (lab.a().netns_path(), lab.b().netns_path());
    let mover = at_fault_point(fault.clone(), move |_| {
        let sh = |ns: &std::path::Path, script: &str| {
            let _ = Command::new("nsenter").arg(format!("--net={}", ns.display())).args(["sh", "-c", script]).status();
        };
        sh(&b_ns, "nft add table inet phaul_test_busy && nft add chain inet phaul_test_busy in '{ type filter hook input priority -10; }' && nft add rule inet phaul_test_busy in ip daddr 10.91.0.100 tcp dport 7100 drop");
        sh(&a_ns, "ip addr del 10.91.0.100/32 dev lo");
        sh(&b_ns, "ip addr add 10.91.0.100/32 dev lo");
        true
    });
    let m = migrate_and_check(
        &lab,
        &mut w,
        MigrateOptions { src_env: fault_env("src:notify:post-dump", &fault), ..Default::default() },
    );
    assert!(mover.join().expect("mover"), "the source never stopped inside post-dump");
    let _ = Command::new("nsenter")
        .arg(format!("--net={}", lab.b().netns_path().display()))
        .args(["nft", "delete", "table", "inet", "phaul_test_busy"])
        .status();
    *migrated_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for (i, h) in holders.into_iter().enumerate() {
        let (n, after) = h.join().expect("holder").unwrap_or_else(|e| panic!("established connection {i} broke: {e}"));
        assert!(after > 10, "connection {i} got {after} pongs after the migration ({n} in all)");
    }
    let tried = connector.join().expect("connector");
    assert!(new_ok_after.load(Ordering::SeqCst) > 5, "new clients were not served on B ({tried} tries)");
    let after = probe_ok(&w, m.restored);
    assert!(after["accepted"].as_u64() > before["accepted"].as_u64(), "{after}");
}
