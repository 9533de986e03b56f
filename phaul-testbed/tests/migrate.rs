//! End-to-end live migrations of the workload zoo from host A to host B (two network namespaces), with the real
//! CRIU. Each test asserts the workload runs on B with its state intact and is gone from A.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use common::*;
use phaul_testbed::MigrateOptions;

#[test]
fn memory_holder_keeps_its_256_mib_intact() {
    let lab = lab("mem");
    let mut w = lab.start_workload("memory", &["--size-mib", "256"]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    assert_eq!(m.after["actual_checksum"], m.before["expected_checksum"]);
    assert_eq!(m.after["expected_checksum"], m.before["expected_checksum"]);
    let r = m.run.report.expect("report");
    // All of the memory crossed the memory channel: at least 256 MiB of pages.
    assert!(r["channels"]["memory_pages"].as_u64().unwrap_or(0) >= 256 << 20, "{r}");
    assert_eq!(r["memory"]["strategy"], "stop-and-copy", "{r}");
    assert!(r["frozen_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    assert!(r["restore_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
}

#[test]
fn multi_process_tree_joined_by_pipes() {
    let lab = lab("pipes");
    let mut w = lab.start_workload("pipes", &[]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    assert_eq!(u64_of(&m.after, "processes"), 3);
    let t0 = u64_of(&m.after, "token");
    let later = w.wait_state("the token to move on", Duration::from_secs(10), |s| s["token"].as_u64() > Some(t0));
    assert!(later.is_ok(), "the pipe ring stopped after the migration");
}

#[test]
fn multi_threaded_process() {
    let lab = lab("threads");
    let mut w = lab.start_workload("threads", &["--threads", "4"]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    std::thread::sleep(Duration::from_millis(300));
    // A second probe: every thread's counter must have grown again (the workload checks it).
    probe_ok(&w, m.restored);
    assert_eq!(m.after["thread_counters"].as_array().map(Vec::len), Some(4));
}

#[test]
fn process_appending_to_an_open_file() {
    let lab = lab("append");
    let file = lab.path("append.log");
    let mut w = lab.start_workload("file-append", &["--file", &file.display().to_string()]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    let n = u64_of(&m.after, "lines_written");
    assert!(n >= u64_of(&m.before, "lines_written"));
    w.wait_state("more lines", Duration::from_secs(10), |s| s["lines_written"].as_u64() > Some(n + 3))
        .expect("the restored process keeps appending");
    // The workload's own check reads the file: lines 0..n in order, none lost or doubled.
    probe_ok(&w, m.restored);
}

#[test]
fn unix_socket_pair() {
    let lab = lab("unix");
    let mut w = lab.start_workload("unix-pair", &[]).expect("start");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    let e = u64_of(&m.after, "exchanges");
    w.wait_state("more exchanges", Duration::from_secs(10), |s| s["exchanges"].as_u64() > Some(e + 5))
        .expect("the socket pair keeps talking");
}

#[test]
fn counter_continues_and_does_not_restart() {
    let lab = lab("counter");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    w.wait_counter_above(20, Duration::from_secs(10)).expect("counting");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    let c = u64_of(&m.after, "counter");
    assert!(c > 20, "counter {c} restarted");
    w.wait_counter_above(c + 5, Duration::from_secs(10)).expect("the counter keeps counting on B");
}

/// The service address moves with the workload, as a floating IP does: A owns it while the server runs there,
/// B gets it for the restore, and the client (a socket in host B, outside the migrated tree) keeps its
/// established connection across the move.
#[test]
fn tcp_server_keeps_an_established_connection() {
    const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 100);
    let lab = lab("tcp");
    lab.a().run("ip", ["addr", "add", "10.91.0.100/32", "dev", "lo"]).expect("service address on A");
    let mut w = lab.start_workload("tcp-server", &["--listen", "10.91.0.100:7000"]).expect("start");
    let client = lab
        .b()
        .in_netns(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&(SERVICE, 7000).into(), Duration::from_secs(5))
        })
        .expect("enter B")
        .expect("connect from B to the server on A");
    client.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut ask = |n: u32| -> String {
        (&client).write_all(format!("ping {n}\n").as_bytes()).expect("send ping");
        let mut line = String::new();
        reader.read_line(&mut line).expect("read pong");
        line.trim().to_string()
    };
    assert_eq!(ask(1), "pong 1 1");
    assert_eq!(ask(2), "pong 2 2");
    // The address must exist on B for the restore; B now delivers it locally, so the connection must be quiet
    // first (a late delayed ACK to the address would meet no socket on B and reset the connection), and the
    // client sends nothing until the workload runs on B.
    std::thread::sleep(Duration::from_secs(1));
    lab.b().run("ip", ["addr", "add", "10.91.0.100/32", "dev", "lo"]).expect("service address on B");
    let m = migrate_and_check(&lab, &mut w, MigrateOptions::default());
    lab.a().run("ip", ["addr", "del", "10.91.0.100/32", "dev", "lo"]).expect("drop the address on A");
    assert_eq!(m.after["connected"], true, "{}", m.after);
    // Same connection, same server state: the served count goes on from 2.
    assert_eq!(ask(3), "pong 3 3");
    assert_eq!(ask(4), "pong 4 4");
}

/// phaul's own TCP connections (`serve --listen` / `migrate --to`) with mutual TLS, on loopback inside host A.
#[test]
fn own_tls_connections_on_loopback() {
    let lab = lab("owntcp");
    let pki = Pki::new(&lab);
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let before = probe_ok(&w, w.pid());
    let addr = format!("127.0.0.1:{}", 20000 + (std::process::id() % 20000));
    let rpid = lab.path("owntcp.rpid");
    let serve = serve_listening(&lab, &addr, true, Some(&pki));
    let out = migrate_to(&lab, w.pid(), &addr, &rpid, Some(&pki));
    let served = serve.collect();
    assert!(out.status.success(), "{}\n{}\n{}", out.stdout, out.stderr, served.stderr);
    assert!(served.status.success(), "{}", served.stderr);
    let restored = restored_pid(&rpid);
    w.adopt_pid(restored).expect("adopt");
    assert!(phaul_testbed::wait_pid_gone(w.pid(), Duration::from_secs(10)));
    let after = probe_ok(&w, restored);
    assert!(u64_of(&after, "counter") >= u64_of(&before, "counter"));
}

/// `phaul serve` under systemd's socket activation (as `phaul-serve.socket` starts it): no `--listen`, the
/// listening socket comes as descriptor 3 with LISTEN_PID/LISTEN_FDS, TLS as usual.
#[test]
fn serve_takes_its_listening_socket_from_systemd_socket_activation() {
    let lab = lab("sockact");
    let pki = Pki::new(&lab);
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let before = probe_ok(&w, w.pid());
    let addr = format!("127.0.0.1:{}", 21000 + (std::process::id() % 19000));
    let rpid = lab.path("sockact.rpid");
    let serve = serve_socket_activated(&lab, &addr, Some(&pki));
    let out = migrate_to(&lab, w.pid(), &addr, &rpid, Some(&pki));
    let served = serve.collect();
    assert!(out.status.success(), "{}\n{}\n{}", out.stdout, out.stderr, served.stderr);
    assert!(served.stderr.contains("serving on 127.0.0.1:"), "{}", served.stderr);
    let restored = restored_pid(&rpid);
    w.adopt_pid(restored).expect("adopt");
    let after = probe_ok(&w, restored);
    assert!(u64_of(&after, "counter") >= u64_of(&before, "counter"));
    // Neither --listen, --fdrpc nor a socket from systemd: refused, saying what to give.
    let plugins = lab.plugins.display().to_string();
    let err = match lab.a().run(&lab.phaul, ["--plugins", plugins.as_str(), "serve", "--insecure-loopback"]) {
        Err(phaul_testbed::TestbedError::CommandFailed { status, stderr, .. }) => {
            assert_eq!(status, "exit status: 2", "{stderr}");
            stderr
        }
        other => panic!("phaul serve with nothing to listen on must fail, got {other:?}"),
    };
    assert!(err.contains("needs --listen HOST:PORT, or --fdrpc FD") && err.contains("phaul-serve.socket"), "{err}");
}

/// `phaul serve --listen --insecure-loopback` without `--once` serves one migration after another.
#[test]
fn serve_handles_several_migrations_in_a_row() {
    let lab = lab("serial");
    let addr = format!("127.0.0.1:{}", 40000 + (std::process::id() % 20000));
    let mut serve = serve_listening(&lab, &addr, false, None);
    for i in 0..2 {
        let mut w = lab.start_workload("counter", &[]).expect("start");
        let before = probe_ok(&w, w.pid());
        let rpid = lab.path(&format!("serial-{i}.rpid"));
        let out = migrate_to(&lab, w.pid(), &addr, &rpid, None);
        assert!(out.status.success(), "migration {i}: {}\n{}", out.stdout, out.stderr);
        let restored = restored_pid(&rpid);
        w.adopt_pid(restored).expect("adopt");
        let after = probe_ok(&w, restored);
        assert!(u64_of(&after, "counter") >= u64_of(&before, "counter"));
    }
    assert!(serve.alive(), "serve exited after its migrations");
}

fn pump(mut a: TcpStream, mut b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b2, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
}

/// Relays and tunnels may deliver phaul's three connections in any order: here they reach `phaul serve` in
/// reverse (filesystem, memory, then control), and the destination sorts them by their first frame.
#[test]
fn own_tcp_connections_arriving_in_any_order() {
    let lab = lab("reorder");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let base = 30000 + (std::process::id() % 10000) as u16;
    let (serve_addr, relay_addr) = (format!("127.0.0.1:{base}"), format!("127.0.0.1:{}", base + 1));
    let rpid = lab.path("reorder.rpid");
    let pki = Pki::new(&lab);
    let serve = serve_listening(&lab, &serve_addr, true, Some(&pki));
    // The relay lives in host A's network namespace, like the two phaul processes.
    let relay_addr2 = relay_addr.clone();
    let relay = lab
        .a()
        .in_netns(Duration::from_secs(10), move || std::net::TcpListener::bind(&relay_addr2))
        .expect("enter A")
        .expect("relay listens");
    let out = std::thread::scope(|sc| {
        // The relay takes the three connections in order and forwards them in reverse.
        sc.spawn(|| {
            let mut inbound = Vec::new();
            for _ in 0..3 {
                inbound.push(relay.accept().expect("accept").0);
            }
            for conn in inbound.into_iter().rev() {
                let addr = serve_addr.clone();
                let out = lab
                    .a()
                    .in_netns(Duration::from_secs(10), move || TcpStream::connect(&addr))
                    .expect("enter A")
                    .expect("connect to serve");
                pump(conn, out);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        migrate_to(&lab, w.pid(), &relay_addr, &rpid, Some(&pki))
    });
    let served = serve.collect();
    assert!(out.status.success(), "{}\n{}\n{}", out.stdout, out.stderr, served.stderr);
    let restored = restored_pid(&rpid);
    w.adopt_pid(restored).expect("adopt");
    probe_ok(&w, restored);
}
