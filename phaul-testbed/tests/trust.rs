//! Only trusted peers, and no peer that can block `phaul serve`: each hostile client here works against a real
//! `phaul serve --listen` with mutual TLS while a real migration (real CRIU, host A to host B) runs through the
//! same serve, and that migration must succeed with its workload intact and without waiting for the attacker.
//!
//! "Without waiting" is checked against a migration through the same serve just before, with a bound loose
//! enough for a loaded machine (twice that time plus 5 s) and well below what any of these clients could hold a
//! serve for if it were able to (the 10 s handshake deadline, `--timeout`, or for as long as it trickles).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use phaul_core::transport::tls::TlsFiles;
use phaul_core::transport::{Channel, ChannelName, Dialer};
use phaul_core::wire;
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, ChannelKind};
use phaul_testbed::{pid_alive, pids_in_netns, Lab};

/// A port for this test process and `slot`, away from the other test files' ports.
fn addr(slot: u16) -> String {
    format!("127.0.0.1:{}", 42000 + (std::process::id() % 2000) as u16 * 10 + slot)
}

/// A migration of a fresh counter through `addr`; asserts it succeeded and the counter went on. Returns how long
/// it took and the workload (now the restored tree in host B; ended by pid when dropped).
fn migrate_one(lab: &Lab, pki: &Pki, addr: &str, tag: &str) -> (Duration, phaul_testbed::Workload, i32) {
    let mut wl = lab.start_workload("counter", &[]).expect("start the workload");
    let before = probe_ok(&wl, wl.pid());
    let rpid = lab.path(&format!("{tag}.rpid"));
    let started = Instant::now();
    let out = migrate_to(lab, wl.pid(), addr, &rpid, Some(pki));
    let took = started.elapsed();
    assert!(out.status.success(), "migration {tag} failed:\n{}\n{}", out.stdout, out.stderr);
    let restored = restored_pid(&rpid);
    wl.adopt_pid(restored).expect("adopt the restored pid");
    let after = probe_ok(&wl, restored);
    assert!(u64_of(&after, "counter") >= u64_of(&before, "counter"), "migration {tag}: the counter restarted");
    (took, wl, restored)
}

/// Asserts `took` is within the loose bound of the module comment.
fn assert_prompt(took: Duration, baseline: Duration, what: &str) {
    let bound = baseline * 2 + Duration::from_secs(5);
    assert!(took <= bound, "the migration beside {what} took {took:?}, against {baseline:?} alone: it was held up");
}

/// A real migration beside `attack`: first one through `addr` alone (the baseline), then `attack` starts on a
/// thread of its own and, 300 ms later, a second migration; `attack` is told through its flag when that one is
/// done. Returns what `attack` returned.
fn beside<T: Send>(lab: &Lab, pki: &Pki, addr: &str, what: &str, attack: impl FnOnce(&AtomicBool) -> T + Send) -> T {
    let (baseline, _first, _) = migrate_one(lab, pki, addr, "baseline");
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let attacker = sc.spawn(|| attack(&done));
        std::thread::sleep(Duration::from_millis(300));
        let (took, _second, _) = migrate_one(lab, pki, addr, "beside");
        done.store(true, Ordering::SeqCst);
        assert_prompt(took, baseline, what);
        attacker.join().expect("the attack thread panicked")
    })
}

/// Waits until `done` is set (2 minutes at most).
fn until(done: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP connection to `addr` made in host A.
fn raw_connect(lab: &Lab, addr: &str) -> TcpStream {
    let a = addr.to_string();
    lab.a().in_netns(Duration::from_secs(10), move || TcpStream::connect(&a)).expect("enter host A").expect("connect")
}

/// A peer holding a certificate of the right CA (mallory.test): authenticated, but sending what it likes.
fn rogue_dial(lab: &Lab, pki: &Pki, addr: &str, name: ChannelName) -> Channel {
    let files = TlsFiles {
        cert: pki.dir.join("mallory.test.pem"),
        key: pki.dir.join("mallory.test.key"),
        ca: pki.dir.join("ca.pem"),
        crl: None,
        allow: Vec::new(),
    };
    let config = files.client_config().expect("mallory's TLS configuration");
    let dialer = Dialer::Tls { config, server_name: "hostb.test".into() };
    let a = addr.to_string();
    lab.a()
        .in_netns(Duration::from_secs(20), move || dialer.dial(&a, name, Duration::from_secs(10), 10))
        .expect("enter host A")
        .expect("mallory connects")
}

/// A fresh, well-formed session id.
fn session_id(tag: u64) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:016x}{:016x}", (t as u64) ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15), std::process::id() as u64 + tag)
}

fn hello(session: &str) -> Body {
    Body::Hello(w::Hello {
        protocol_version: phaul_proto::PROTOCOL_VERSION,
        phaul_version: "mallory".into(),
        criu: Some(w::CriuVersion { major: 3, minor: 17, sublevel: 0, text: "3.17".into() }),
        session: session.into(),
        skip_criu_check: true,
        timeout_ms: 0,
    })
}

/// The next frame, or `None` once the destination closed the connection (bounded by 30 s).
fn next_frame(ch: &mut Channel) -> Option<Body> {
    ch.set_read_timeout(Duration::from_secs(30)).expect("read timeout");
    match wire::recv(ch) {
        Ok(b) => Some(b),
        Err(wire::WireError::Timeout { .. }) => {
            panic!("the destination neither answered nor closed within 30 s")
        }
        Err(_) => None,
    }
}

fn failure_text(b: Option<Body>) -> String {
    match b {
        Some(Body::Failure(f)) => f.message,
        other => panic!("expected a Failure, got {:?}", other.as_ref().map(wire::body_name)),
    }
}

/// Every path under `dir` whose name contains `needle`.
fn find_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return found };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(p.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(find_named(&p, needle));
        }
    }
    found
}

#[test]
fn a_silent_connection_does_not_delay_a_migration() {
    let lab = lab("silent");
    let pki = Pki::new(&lab);
    let addr = addr(0);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    let (closed_after, read) = beside(&lab, &pki, &addr, "a silent connection", |_| {
        let mut silent = raw_connect(&lab, &addr);
        let opened = Instant::now();
        silent.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut buf = [0u8; 64];
        let r = silent.read(&mut buf).map_err(|e| e.kind());
        (opened.elapsed(), r)
    });
    // The silent connection is closed by serve once its handshake deadline passed, not kept for ever.
    assert!(matches!(read, Ok(0) | Err(_)), "serve sent bytes to a connection that never spoke: {read:?}");
    assert!(closed_after < Duration::from_secs(30), "serve kept a silent connection for {closed_after:?}");
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}

#[test]
fn a_trickling_client_does_not_delay_a_migration() {
    let lab = lab("trickle");
    let pki = Pki::new(&lab);
    let addr = addr(1);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    // The start of a TLS record, one byte every 300 ms, for up to 60 s: a handshake that never completes.
    let cut_after = beside(&lab, &pki, &addr, "a trickling client", |_| {
        let mut conn = raw_connect(&lab, &addr);
        let started = Instant::now();
        let bytes = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        let mut i = 0usize;
        while started.elapsed() < Duration::from_secs(60) {
            if conn.write_all(&bytes[i % bytes.len()..][..1]).is_err() {
                return Some(started.elapsed());
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        None
    });
    let cut_after = cut_after.expect("serve let a client trickle its handshake for 60 s");
    assert!(cut_after < Duration::from_secs(30), "the trickle went on for {cut_after:?}");
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}

#[test]
fn two_hundred_idle_connections_do_not_delay_a_migration() {
    let lab = lab("idle200");
    let pki = Pki::new(&lab);
    let addr = addr(2);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    let held = beside(&lab, &pki, &addr, "200 idle connections", |done| {
        let a = addr.clone();
        let idle = lab
            .a()
            .in_netns(Duration::from_secs(60), move || (0..200).map(|_| TcpStream::connect(&a)).collect::<Vec<_>>())
            .expect("enter host A");
        let idle: Vec<TcpStream> = idle.into_iter().collect::<Result<_, _>>().expect("200 connections");
        until(done);
        idle.len()
    });
    assert_eq!(held, 200);
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
    let log = serve.log_text();
    assert!(log.contains("closing the oldest"), "serve did not say that its limit on waiting connections bit:\n{log}");
}

#[test]
fn a_quiet_session_does_not_delay_a_migration_and_ends_after_the_timeout() {
    let lab = lab("quiet");
    let pki = Pki::new(&lab);
    let addr = addr(3);
    // --timeout bounds how long a session may send nothing; 20 s keeps CRIU's own waits comfortable.
    let mut serve = serve_listening_with(&lab, &addr, false, Some(&pki), &["--timeout", "20"]);
    let (text, opened_for, after) = beside(&lab, &pki, &addr, "a quiet session", |done| {
        let session = session_id(3);
        let mut rpc = rogue_dial(&lab, &pki, &addr, ChannelName::Rpc);
        wire::send(&mut rpc, hello(&session)).expect("hello");
        let r = next_frame(&mut rpc);
        assert!(matches!(r, Some(Body::HelloReply(_))), "no HelloReply: {:?}", r.as_ref().map(wire::body_name));
        let mut data = Vec::new();
        for kind in [ChannelKind::ChannelMemory, ChannelKind::ChannelFs] {
            let mut ch = rogue_dial(&lab, &pki, &addr, ChannelName::Mem);
            wire::send(&mut ch, Body::ChannelOpen(w::ChannelOpen { session: session.clone(), kind: kind as i32 }))
                .expect("channel open");
            data.push(ch);
        }
        let opened = Instant::now();
        until(done);
        // Then the quiet session is ended: a Failure saying the source sent nothing, and the connection closed.
        let text = failure_text(next_frame(&mut rpc));
        (text, opened.elapsed(), next_frame(&mut rpc).map(|b| wire::body_name(&b)))
    });
    assert!(text.contains("sent nothing"), "{text}");
    assert!(opened_for < Duration::from_secs(45), "the quiet session lasted {opened_for:?}");
    assert!(after.is_none(), "the session went on after its Failure: {after:?}");
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}

#[test]
fn a_session_id_with_dot_dot_is_refused_and_writes_nothing() {
    let lab = lab("dotdot");
    let pki = Pki::new(&lab);
    let addr = addr(4);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    let answers = beside(&lab, &pki, &addr, "sessions named ../", |_| {
        let mut answers = Vec::new();
        // As a session's Hello.
        let mut rpc = rogue_dial(&lab, &pki, &addr, ChannelName::Rpc);
        wire::send(&mut rpc, hello("../../../escape-hello")).expect("hello");
        answers.push(("Hello", next_frame(&mut rpc)));
        answers.push(("after the refused Hello", next_frame(&mut rpc)));
        // As a data channel's session.
        let mut ch = rogue_dial(&lab, &pki, &addr, ChannelName::Mem);
        let open = w::ChannelOpen { session: "../escape-open".into(), kind: ChannelKind::ChannelMemory as i32 };
        wire::send(&mut ch, Body::ChannelOpen(open)).expect("channel open");
        answers.push(("ChannelOpen", next_frame(&mut ch)));
        // As a resolution's session.
        let mut res = rogue_dial(&lab, &pki, &addr, ChannelName::Rpc);
        let r = w::Resolve { session: "../../escape-resolve".into(), decision: w::Decision::Commit as i32 };
        wire::send(&mut res, Body::Resolve(r)).expect("resolve");
        answers.push(("Resolve", next_frame(&mut res)));
        answers
    });
    for (what, answer) in answers {
        match answer {
            None => {}
            Some(Body::Failure(f)) => {
                assert!(f.message.contains("session"), "{what}: the refusal does not name the session: {}", f.message)
            }
            Some(other) => panic!("{what}: serve answered {} to a session named ../", wire::body_name(&other)),
        }
    }
    // Where the names would have led: under the scratch directory, or up to three levels above its
    // directories.
    let scratch = lab.scratch.path().to_path_buf();
    let mut found = find_named(&scratch, "escape");
    for up in scratch.ancestors().skip(1) {
        let Ok(rd) = std::fs::read_dir(up) else { continue };
        found.extend(rd.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains("escape-")));
    }
    assert!(found.is_empty(), "serve made files for a session named ../: {found:?}");
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}

#[test]
fn a_peer_chosen_rpid_path_is_refused_and_the_file_is_untouched() {
    let lab = lab("rpidpath");
    let pki = Pki::new(&lab);
    let addr = addr(5);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    // A file the peer would like overwritten as root, outside --rpid-dir (the scratch directory), and one inside.
    let outside = tempfile::NamedTempFile::new().expect("victim file");
    std::fs::write(outside.path(), "precious\n").expect("write victim");
    let inside = lab.path("inside-victim");
    std::fs::write(&inside, "precious too\n").expect("write victim");
    let names = vec![
        outside.path().display().to_string(),
        format!("../{}", outside.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        "..".to_string(),
        "a/../../inside-victim".to_string(),
        "x".repeat(65),
    ];
    let results = beside(&lab, &pki, &addr, "sessions asking for rpid paths", |_| {
        let mut results = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let session = session_id(50 + i as u64);
            let mut rpc = rogue_dial(&lab, &pki, &addr, ChannelName::Rpc);
            wire::send(&mut rpc, hello(&session)).expect("hello");
            assert!(matches!(next_frame(&mut rpc), Some(Body::HelloReply(_))), "no HelloReply");
            let mut data = Vec::new();
            for kind in [ChannelKind::ChannelMemory, ChannelKind::ChannelFs] {
                let mut ch = rogue_dial(&lab, &pki, &addr, ChannelName::Mem);
                wire::send(&mut ch, Body::ChannelOpen(w::ChannelOpen { session: session.clone(), kind: kind as i32 }))
                    .expect("channel open");
                data.push(ch);
            }
            let setup = w::Setup {
                htype: "pid".into(),
                id: "4194304".into(),
                mode: w::Mode::Live as i32,
                fs_driver: "shared".into(),
                has_fs_channel: true,
                dst_rpid: name.clone(),
                ..Default::default()
            };
            wire::send(&mut rpc, Body::Setup(setup)).expect("setup");
            let refusal = failure_text(next_frame(&mut rpc));
            // A failed Setup ends the session: a StartRound after it starts no page server.
            let _ = wire::send(&mut rpc, Body::StartRound(w::StartRound { round: 0, ..Default::default() }));
            let after = next_frame(&mut rpc);
            results.push((name, refusal, after.map(|b| wire::body_name(&b))));
        }
        results
    });
    for (name, refusal, after) in results {
        assert!(refusal.contains("dst-rpid") || refusal.contains("restored-pid"), "{name:?}: {refusal}");
        assert!(after.is_none(), "{name:?}: the session went on after its failed Setup and answered {after:?}");
    }
    assert_eq!(std::fs::read_to_string(outside.path()).expect("victim"), "precious\n");
    assert_eq!(std::fs::read_to_string(&inside).expect("victim"), "precious too\n");
    // Nor did any of those sessions leave an image directory behind.
    let left = find_named(&lab.path("dst-images"), "4194304");
    assert!(left.is_empty(), "image directories of refused sessions: {left:?}");
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}

/// Collects a copy of everything a client sends through a relay in host A, per connection.
type Recording = Arc<Mutex<Vec<Vec<u8>>>>;

/// Relays connections from `listen` to `to` (both in host A), recording the client's bytes; runs until `n`
/// connections were relayed to their end.
fn recording_relay(lab: &Lab, listen: &str, to: &str, n: usize) -> (Recording, std::thread::JoinHandle<()>) {
    let l = listen.to_string();
    let listener = lab
        .a()
        .in_netns(Duration::from_secs(10), move || std::net::TcpListener::bind(&l))
        .expect("enter A")
        .expect("bind");
    let rec: Recording = Arc::new(Mutex::new(Vec::new()));
    let (rec2, to) = (rec.clone(), to.to_string());
    let outbound: Vec<TcpStream> = (0..n).map(|_| raw_connect(lab, &to)).collect();
    let h = std::thread::spawn(move || {
        let mut pumps = Vec::new();
        for out in outbound {
            let (client, _) = listener.accept().expect("accept");
            let slot = {
                let mut r = rec2.lock().unwrap_or_else(|p| p.into_inner());
                r.push(Vec::new());
                r.len() - 1
            };
            let (mut c_read, mut c_write) = (client.try_clone().expect("clone"), client);
            let (mut o_read, mut o_write) = (out.try_clone().expect("clone"), out);
            let rec3 = rec2.clone();
            pumps.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(k) = c_read.read(&mut buf) {
                    if k == 0 || o_write.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    rec3.lock().unwrap_or_else(|p| p.into_inner())[slot].extend_from_slice(&buf[..k]);
                }
                let _ = o_write.shutdown(std::net::Shutdown::Write);
            }));
            pumps.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut o_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            }));
        }
        for p in pumps {
            let _ = p.join();
        }
    });
    (rec, h)
}

#[test]
fn a_replayed_recording_sent_by_nobody_restores_nothing() {
    let lab = lab("replay");
    let pki = Pki::new(&lab);
    let (addr, relay) = (addr(6), addr(7));
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    // A real migration, recorded on its way (the relay opens its three connections to serve first: serve sorts
    // them by their first frame, whatever the order).
    let (rec, relaying) = recording_relay(&lab, &relay, &addr, 3);
    let mut wl = lab.start_workload("counter", &[]).expect("start");
    let rpid = lab.path("recorded.rpid");
    let t0 = Instant::now();
    let out = migrate_to(&lab, wl.pid(), &relay, &rpid, Some(&pki));
    let recorded_took = t0.elapsed();
    assert!(out.status.success(), "the recorded migration failed:\n{}\n{}", out.stdout, out.stderr);
    let recorded = restored_pid(&rpid);
    wl.adopt_pid(recorded).expect("adopt");
    relaying.join().expect("relay");
    let recordings = rec.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(recordings.len(), 3);
    assert!(recordings.iter().all(|r| r.len() > 100), "the recording is empty");
    std::fs::remove_file(&rpid).expect("remove rpid");

    // Now uid 65534 sends each recorded connection to serve again, beside a new real migration.
    let files: Vec<PathBuf> = recordings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let f = lab.path(&format!("recording-{i}"));
            std::fs::write(&f, r).expect("write recording");
            f
        })
        .collect();
    let port = addr.rsplit(':').next().unwrap_or_default().to_string();
    let replays: Vec<std::process::Child> = files
        .iter()
        .map(|f| {
            let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && cat >&3 && timeout 10 cat <&3 >/dev/null");
            let mut cmd = lab.a().command(
                "setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups", "--", "bash", "-c", script.as_str()],
            );
            // The recording comes in on standard input: uid 65534 cannot read the scratch directory.
            cmd.stdin(std::fs::File::open(f).expect("recording")).stdout(std::process::Stdio::null());
            cmd.stderr(std::process::Stdio::null());
            cmd.spawn().expect("replay as nobody")
        })
        .collect();
    let (took, _fresh_wl, fresh) = migrate_one(&lab, &pki, &addr, "beside-replay");
    assert_prompt(took, recorded_took, "three replayed connections");
    for mut c in replays {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    // Nothing was restored again: every workload process in host A (where serve runs) belongs to one of the two
    // real migrations.
    let ns = |pid: i32| std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino()).ok();
    let ours = [ns(recorded), ns(fresh)];
    assert!(pid_alive(recorded), "the recorded migration's workload {recorded} died:\n{}", serve.log_text());
    assert!(pid_alive(fresh), "the new migration's workload {fresh} died");
    let a = lab.a().netns_inode().expect("netns of A");
    let bin = std::fs::canonicalize(&lab.workload_bin).expect("workload binary");
    for pid in pids_in_netns(a).expect("pids in A") {
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == bin) {
            assert!(ours.contains(&ns(pid)), "workload pid {pid} runs and belongs to no real migration");
        }
    }
    assert!(!rpid.exists(), "the replay made serve write the recorded session's restored-pid file again");
    let log = serve.log_text();
    let refusals = log.lines().filter(|l| l.contains("refusing a connection") && l.contains("TLS handshake")).count();
    assert!(refusals >= 3, "serve did not log its refusal of each replayed connection:\n{log}");
    assert!(serve.alive(), "serve exited:\n{log}");
}

#[test]
fn eight_concurrent_tls_migrations_into_one_serve() {
    let lab = lab("eight");
    let pki = Pki::new(&lab);
    let addr = addr(8);
    let mut serve = serve_listening(&lab, &addr, false, Some(&pki));
    let mut started = Vec::new();
    for i in 0..8 {
        let wl = lab.start_workload("counter", &[]).expect("start");
        let before = probe_ok(&wl, wl.pid());
        started.push((i, wl, before));
    }
    let results: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = started
            .iter()
            .map(|(i, wl, _)| {
                let (lab, pki, addr) = (&lab, &pki, &addr);
                let pid = wl.pid();
                sc.spawn(move || migrate_to(lab, pid, addr, &lab.path(&format!("eight-{i}.rpid")), Some(pki)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("migration thread")).collect()
    });
    for ((i, mut wl, before), out) in started.into_iter().zip(results) {
        assert!(out.status.success(), "migration {i} of 8 failed:\n{}\n{}", out.stdout, out.stderr);
        let restored = restored_pid(&lab.path(&format!("eight-{i}.rpid")));
        let old = wl.pid();
        wl.adopt_pid(restored).expect("adopt");
        assert!(phaul_testbed::wait_pid_gone(old, Duration::from_secs(10)), "migration {i}: the source still runs");
        let after = probe_ok(&wl, restored);
        assert!(u64_of(&after, "counter") >= u64_of(&before, "counter"), "migration {i}: the counter restarted");
        // `phaul serve --listen` runs in host A here (loopback), so that is where the restored trees are.
        assert_eq!(
            phaul_testbed::netns_of_pid(restored).expect("netns"),
            lab.a().netns_inode().expect("netns of A"),
            "migration {i}: not restored by serve"
        );
    }
    assert!(serve.alive(), "serve exited:\n{}", serve.log_text());
}
