//! End-to-end tests of the testbed itself. Run as root, after `cargo build -p phaul-workloads`:
//! `cargo build -p phaul-workloads && cargo test -p phaul-testbed`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use phaul_testbed::{
    become_subreaper, locate_binary, netns_of_pid, ns_pids, pid_alive, pids_in_netns, reap_pid, require_root,
    run_command, socket_netns_inode, spawn_with_fds, state_ok, wait_pid_gone, Host, HostPair, TestbedError, Workload,
    ADDR_A, ADDR_B, COMMAND_TIMEOUT, PROBE_TIMEOUT,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

fn workload_bin() -> PathBuf {
    locate_binary("phaul-workload").expect("phaul-workload must be built: cargo build -p phaul-workloads")
}

fn netns_listed(name: &str) -> bool {
    let out =
        run_command(std::process::Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT).expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
}

fn mount_ns_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt ns link").display().to_string()
}

#[test]
fn root_is_required_and_present() {
    require_root().expect("these tests must run as root");
}

#[test]
fn host_pair_creation_and_teardown() {
    let pair = HostPair::new("create").expect("host pair");
    let (a, b) = (pair.a().name().to_string(), pair.b().name().to_string());
    assert_ne!(a, b);
    assert!(a.starts_with("phaul-create-") && a.ends_with("-a"), "{a}");
    assert!(pair.a().netns_path().exists() && pair.b().netns_path().exists());
    assert!(netns_listed(&a) && netns_listed(&b));
    assert!(pair.a().veth().len() <= 15 && pair.b().veth().len() <= 15);
    assert_eq!(pair.a().addr(), ADDR_A);
    assert_eq!(pair.b().addr(), ADDR_B);

    let ia = pair.a().netns_inode().expect("inode A");
    let ib = pair.b().netns_inode().expect("inode B");
    let me = netns_of_pid(std::process::id() as i32).expect("own netns");
    assert!(ia != ib && ia != me && ib != me);

    // Addresses and links are configured inside the namespaces.
    let out = pair.a().run("ip", ["-4", "-o", "addr", "show", "dev", pair.a().veth()]).expect("ip addr in A");
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.91.0.1/24"));
    let out = pair.b().run("ip", ["-o", "link", "show", "lo"]).expect("ip link in B");
    assert!(String::from_utf8_lossy(&out.stdout).contains("UP"), "lo must be up in B");

    drop(pair);
    assert!(!netns_listed(&a) && !netns_listed(&b), "netns left behind");
    assert!(!PathBuf::from("/run/netns").join(&a).exists());
    assert!(!PathBuf::from("/run/netns").join(&b).exists());
}

#[test]
fn parallel_host_pairs_do_not_collide() {
    let handles: Vec<_> = (0..3).map(|_| std::thread::spawn(|| HostPair::new("par"))).collect();
    let pairs: Vec<HostPair> =
        handles.into_iter().map(|h| h.join().expect("thread").expect("host pair in parallel")).collect();
    let mut names: Vec<&str> = pairs.iter().flat_map(|p| [p.a().name(), p.b().name()]).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 6);
}

#[test]
fn bad_tag_is_rejected() {
    assert!(matches!(HostPair::new("has space"), Err(TestbedError::InvalidArgument(_))));
    assert!(matches!(HostPair::new(""), Err(TestbedError::InvalidArgument(_))));
}

fn exchange(a: &OwnedFd, b: &OwnedFd, label: &str) {
    let mut sa = TcpStream::from(a.try_clone().expect("dup a"));
    let mut sb = TcpStream::from(b.try_clone().expect("dup b"));
    sa.set_read_timeout(Some(T)).expect("timeout");
    sb.set_read_timeout(Some(T)).expect("timeout");
    let msg = format!("{label} from A to B");
    sa.write_all(msg.as_bytes()).expect("write A");
    let mut buf = vec![0u8; msg.len()];
    sb.read_exact(&mut buf).expect("read B");
    assert_eq!(buf, msg.as_bytes());
    let reply = format!("{label} from B to A, a bit longer");
    sb.write_all(reply.as_bytes()).expect("write B");
    let mut buf = vec![0u8; reply.len()];
    sa.read_exact(&mut buf).expect("read A");
    assert_eq!(buf, reply.as_bytes());

    // The A end is a socket of host A talking to host B over the veth, and vice versa.
    assert_eq!(sa.local_addr().expect("local A").ip(), ADDR_A);
    assert_eq!(sa.peer_addr().expect("peer A").ip(), ADDR_B);
    assert_eq!(sb.local_addr().expect("local B").ip(), ADDR_B);
    assert_eq!(sb.peer_addr().expect("peer B").ip(), ADDR_A);
}

#[test]
fn tcp_channel_triple_carries_bytes_both_ways_between_the_hosts() {
    let pair = HostPair::new("chan").expect("host pair");
    let triple = pair.channel_triple().expect("channels");
    let ia = pair.a().netns_inode().expect("inode A");
    let ib = pair.b().netns_inode().expect("inode B");
    for (label, (a, b)) in [("rpc", &triple.rpc), ("mem", &triple.mem), ("fs", &triple.fs)] {
        exchange(a, b, label);
        assert_eq!(socket_netns_inode(a.as_fd()).expect("netns of A end"), ia, "{label}: A end not in A");
        assert_eq!(socket_netns_inode(b.as_fd()).expect("netns of B end"), ib, "{label}: B end not in B");
    }
}

#[test]
fn host_command_runs_in_the_netns_without_a_new_mount_namespace() {
    let pair = HostPair::new("cmd").expect("host pair");
    let out = pair.a().run("readlink", ["/proc/self/ns/net", "/proc/self/ns/mnt"]).expect("readlink in A");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let net = lines.next().expect("net line");
    let mnt = lines.next().expect("mnt line");
    assert_eq!(net, format!("net:[{}]", pair.a().netns_inode().expect("inode A")));
    assert_eq!(mnt, mount_ns_of(std::process::id() as i32), "nsenter must not change the mount namespace");
}

#[test]
fn spawn_with_fds_maps_channels_to_fixed_numbers() {
    let pair = HostPair::new("fds").expect("host pair");
    let triple = pair.channel_triple().expect("channels");
    // In host A: read a line from fd 3 (rpc), write it to fd 4 (mem) and "fs" to fd 5.
    let cmd = pair.a().command("sh", ["-c", "read line <&3; echo \"got $line\" >&4; echo fs >&5"]);
    let child = spawn_with_fds(cmd, &[(triple.rpc.0.as_fd(), 3), (triple.mem.0.as_fd(), 4), (triple.fs.0.as_fd(), 5)])
        .expect("spawn");
    let mut rpc_b = TcpStream::from(triple.rpc.1.try_clone().expect("dup"));
    rpc_b.write_all(b"hello\n").expect("send");
    let mut mem_b = BufReader::new(TcpStream::from(triple.mem.1.try_clone().expect("dup")));
    mem_b.get_ref().set_read_timeout(Some(T)).expect("timeout");
    let mut line = String::new();
    mem_b.read_line(&mut line).expect("mem line");
    assert_eq!(line, "got hello\n");
    let mut fs_b = BufReader::new(TcpStream::from(triple.fs.1.try_clone().expect("dup")));
    fs_b.get_ref().set_read_timeout(Some(T)).expect("timeout");
    line.clear();
    fs_b.read_line(&mut line).expect("fs line");
    assert_eq!(line, "fs\n");
    let pid = child.id() as i32;
    let status = reap_pid(pid, T).expect("reap").expect("exited in time");
    assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)), "{status:?}");
    drop(child);
}

#[test]
fn spawn_with_fds_rejects_duplicate_targets() {
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let err = spawn_with_fds(std::process::Command::new("true"), &[(r.as_fd(), 3), (r.as_fd(), 3)])
        .expect_err("two mappings to fd 3");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn zombies_count_as_dead_and_reap_pid_is_bounded() {
    become_subreaper().expect("subreaper");
    let child = std::process::Command::new("sleep").arg("0.2").stdout(Stdio::null()).spawn().expect("spawn sleep");
    let pid = child.id() as i32;
    assert!(pid_alive(pid));
    assert_eq!(reap_pid(pid, Duration::from_millis(20)).expect("waitpid"), None, "still running");
    assert!(wait_pid_gone(pid, T), "a zombie is gone");
    assert!(PathBuf::from(format!("/proc/{pid}")).exists(), "not reaped yet: a zombie");
    let status = reap_pid(pid, T).expect("reap").expect("reaped");
    assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)));
    assert!(reap_pid(pid, Duration::from_millis(10)).is_err(), "no longer our child");
    drop(child);
}

#[test]
fn locate_binary_reports_missing_binaries() {
    let err = locate_binary("no-such-phaul-binary").expect_err("missing");
    assert!(err.to_string().contains("cargo build --workspace"), "{err}");
}

/// Start `kind` in host A, check it is pid 1 of its own pid namespace in A's netns, probe it twice.
fn check_kind(pair: &HostPair, kind: &str, args: &[&str]) -> (Workload, Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let w = Workload::start(pair.a(), &workload_bin(), kind, args, &state_dir).expect("workload starts");
    let pid = w.pid();
    assert!(pid_alive(pid));
    let nspids = ns_pids(pid).expect("NSpid");
    assert_eq!(nspids.first(), Some(&pid));
    assert_eq!(nspids.last(), Some(&1), "{kind} must be pid 1 of its own pid namespace: {nspids:?}");
    assert_eq!(netns_of_pid(pid).expect("netns"), pair.a().netns_inode().expect("inode A"));
    assert!(pids_in_netns(pair.a().netns_inode().expect("inode A")).expect("scan").contains(&pid));
    assert_eq!(mount_ns_of(pid), mount_ns_of(std::process::id() as i32), "no new mount namespace");

    let s1 = w.probe(PROBE_TIMEOUT).expect("first probe");
    state_ok(&s1).expect("first probe ok");
    assert_eq!(s1["kind"], kind);
    assert_eq!(s1["ns_pid"], 1);
    let c1 = s1["counter"].as_u64().expect("counter");
    w.wait_counter_above(c1 + 3, T).expect("counter grows");
    let s2 = w.probe(PROBE_TIMEOUT).expect("second probe");
    state_ok(&s2).expect("second probe ok");
    assert_ne!(s1["nonce"], s2["nonce"]);
    assert!(s2["counter"].as_u64().expect("counter") > c1 + 3);
    (w, s2, dir)
}

#[test]
fn workload_counter() {
    let pair = HostPair::new("wcounter").expect("host pair");
    let (w, _, _dir) = check_kind(&pair, "counter", &[]);
    let pid = w.pid();
    drop(w);
    assert!(wait_pid_gone(pid, T), "drop kills the workload");
}

#[test]
fn workload_memory_16mib() {
    let pair = HostPair::new("wmem").expect("host pair");
    let (_w, s, _dir) = check_kind(&pair, "memory", &["--size-mib", "16"]);
    assert_eq!(s["size_mib"], 16);
    assert_eq!(s["expected_checksum"], s["actual_checksum"]);
    assert_eq!(s["expected_checksum"].as_str().map(str::len), Some(16));
}

#[test]
fn workload_pipes() {
    let pair = HostPair::new("wpipes").expect("host pair");
    let (w, s, _dir) = check_kind(&pair, "pipes", &[]);
    assert_eq!(s["processes"], 3);
    let t1 = s["token"].as_u64().expect("token");
    let s2 = w.wait_state("token to move", T, |s| s["token"].as_u64().is_some_and(|t| t > t1)).expect("token moves");
    assert_eq!(s2["token"].as_u64().map(|t| t % 3), Some(2), "the root receives sent + 2 with sends at 3k");
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", w.pid(), w.pid())).expect("children");
    assert_eq!(children.split_whitespace().count(), 2, "two ring children: {children:?}");
}

#[test]
fn workload_threads() {
    let pair = HostPair::new("wthreads").expect("host pair");
    let (w, s, _dir) = check_kind(&pair, "threads", &["--threads", "3"]);
    let counters = s["thread_counters"].as_array().expect("array");
    assert_eq!(counters.len(), 3);
    assert!(counters.iter().all(|c| c.as_u64().is_some_and(|c| c > 0)));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", w.pid())).expect("tasks").count();
    assert_eq!(tasks, 4, "main thread + 3 workers");
}

#[test]
fn workload_file_append() {
    let pair = HostPair::new("wfile").expect("host pair");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("appended.log");
    let file_arg = file.to_str().expect("utf-8 path").to_string();
    let (w, s, _d) = check_kind(&pair, "file-append", &["--file", &file_arg]);
    let n = s["lines_written"].as_u64().expect("lines_written");
    assert!(n > 0);
    let content = std::fs::read_to_string(&file).expect("read file");
    let lines: Vec<u64> = content.lines().map(|l| l.parse().expect("numeric line")).collect();
    assert!(lines.len() as u64 >= n);
    assert!(lines.iter().enumerate().all(|(i, &v)| v == i as u64));
    // The workload keeps exactly that file open.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", w.pid()))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(fds.contains(&file), "{fds:?}");
}

#[test]
fn workload_unix_pair() {
    let pair = HostPair::new("wunix").expect("host pair");
    let (w, s, _dir) = check_kind(&pair, "unix-pair", &[]);
    let e1 = s["exchanges"].as_u64().expect("exchanges");
    w.wait_state("exchanges to grow", T, |s| s["exchanges"].as_u64().is_some_and(|e| e > e1 + 10)).expect("grows");
}

/// Connect (retrying for a bounded time) from inside `host` to `target`.
fn connect_from(host: &Host, target: SocketAddr) -> TcpStream {
    host.in_netns(T + Duration::from_secs(1), move || {
        let deadline = Instant::now() + T;
        loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .expect("thread in host")
    .expect("connect")
}

fn ping_pong(stream: &TcpStream, from: u64, count: u64, served_before: u64) {
    stream.set_read_timeout(Some(T)).expect("timeout");
    let mut w = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream.try_clone().expect("clone"));
    for i in 0..count {
        let n = from + i;
        w.write_all(format!("ping {n}\n").as_bytes()).expect("send ping");
        let mut line = String::new();
        r.read_line(&mut line).expect("read pong");
        assert_eq!(line, format!("pong {n} {}\n", served_before + i + 1));
    }
}

fn tcp_server_case(tag: &str, client_in_b: bool) {
    let pair = HostPair::new(tag).expect("host pair");
    let listen = SocketAddr::new(ADDR_A.into(), 7070);
    let (w, s, _dir) = check_kind(&pair, "tcp-server", &["--listen", &listen.to_string()]);
    assert_eq!(s["listening"], listen.to_string());
    assert_eq!(s["connected"], false);
    let client_host = if client_in_b { pair.b() } else { pair.a() };
    let stream = connect_from(client_host, listen);
    ping_pong(&stream, 100, 5, 0);
    let s = w.probe(PROBE_TIMEOUT).expect("probe");
    state_ok(&s).expect("ok after pings");
    assert_eq!(s["connected"], true);
    assert_eq!(s["served"], 5);
    let expected_peer = if client_in_b { ADDR_B } else { ADDR_A };
    assert!(s["peer"].as_str().is_some_and(|p| p.starts_with(&format!("{expected_peer}:"))), "{s}");
    drop(stream);
    w.wait_state("the peer close to be seen", T, |s| s["peer_closed"] == true).expect("peer closed");
    let s = w.probe(PROBE_TIMEOUT).expect("probe after close");
    state_ok(&s).expect("still ok after close");
    assert!(pid_alive(w.pid()), "keeps running after the peer closes");
    assert_eq!(s["served"], 5);
}

#[test]
fn workload_tcp_server_client_in_host_a() {
    tcp_server_case("wtcpa", false);
}

#[test]
fn workload_tcp_server_client_over_the_veth_from_b() {
    tcp_server_case("wtcpb", true);
}

#[test]
fn workload_start_failure_is_reported() {
    let pair = HostPair::new("wfail").expect("host pair");
    let dir = tempfile::tempdir().expect("tempdir");
    // 10.91.0.2 is B's address, not A's: binding it in A fails.
    let err = Workload::start(pair.a(), &workload_bin(), "tcp-server", &["--listen", "10.91.0.2:7070"], dir.path())
        .expect_err("bind must fail");
    let msg = err.to_string();
    assert!(msg.contains("bind"), "{msg}");
}

#[test]
fn probe_of_a_dead_pid_fails_fast() {
    let pair = HostPair::new("wdead").expect("host pair");
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Workload::start(pair.a(), &workload_bin(), "counter", &[], dir.path()).expect("start");
    let pid = w.pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    assert!(wait_pid_gone(pid, T));
    let t0 = Instant::now();
    assert!(w.probe(PROBE_TIMEOUT).is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
}
