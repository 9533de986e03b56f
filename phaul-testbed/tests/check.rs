//! `phaul check`: the preflight of both ends (`--to`, `--fdrpc`) against a real `phaul serve`, the real CRIU and
//! real workloads, without dumping anything.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use phaul_testbed::{spawn_with_fds, write_plugins_toml, Lab};
use serde_json::Value;

/// `phaul check ARGS --json` in host A: (exit code, the JSON).
fn check(lab: &Lab, plugins: &std::path::Path, args: &[&str]) -> (Option<i32>, Value) {
    let p = plugins.display().to_string();
    let mut all = vec!["--plugins", p.as_str(), "check"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = lab.a().command(&lab.phaul, &all).stdin(Stdio::null()).output().expect("phaul check");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code(), v)
}

fn line<'a>(v: &'a Value, host: &str, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["host"] == host && c["name"] == name))
        .unwrap_or_else(|| panic!("no {host} {name} check in {v:#}"))
}

#[test]
fn check_to_asks_the_destination_and_freezes_nothing() {
    let lab = lab("check");
    let w = lab.start_workload("counter", &[]).expect("start");
    let before = probe_ok(&w, w.pid());
    let addr = format!("127.0.0.1:{}", 22000 + (std::process::id() % 18000));
    let mut serve = serve_listening(&lab, &addr, false, None);
    let pid = w.pid().to_string();
    let (code, v) = check(&lab, &lab.plugins, &["pid", &pid, "--to", &addr, "--insecure-loopback"]);
    assert_eq!(code, Some(0), "{v:#}");
    assert!(v["result"] == "OK" || v["result"] == "WARN", "{v:#}");
    assert_eq!(line(&v, "source", "workload")["level"], "OK", "{v:#}");
    assert!(line(&v, "source", "workload")["message"].as_str().is_some_and(|m| m.contains(&format!("root pid {pid}"))));
    assert!(line(&v, "source", "namespaces")["message"].as_str().is_some_and(|m| m.contains("pid")), "{v:#}");
    for name in ["criu", "criu-version", "cpu", "host-type", "fs-driver", "free-space", "network-lock"] {
        assert_eq!(line(&v, "destination", name)["level"], "OK", "destination {name}: {v:#}");
    }
    assert!(line(&v, "destination", "free-space")["message"].as_str().is_some_and(|m| m.contains("of images")));
    // Nothing was frozen or dumped: the workload ran on, no image set was made on B, and serve still serves.
    let after = probe_ok(&w, w.pid());
    assert!(u64_of(&after, "counter") > u64_of(&before, "counter"));
    let made: Vec<_> = std::fs::read_dir(lab.path("dst-images")).into_iter().flatten().flatten().collect();
    assert!(made.is_empty(), "the destination made {made:?}");
    assert!(serve.alive(), "serve serves on after a preflight");
}

#[test]
fn check_reports_a_destination_without_the_driver_or_the_room() {
    let lab = lab("check-fail");
    let w = lab.start_workload("memory", &["--size-mib", "64"]).expect("start");
    // B has no `shared` driver, and 16 MiB for images.
    write_plugins_toml(&lab.plugins, &["pid"]).expect("B's plugins");
    let ours = lab.path("a-plugins.toml");
    write_plugins_toml(&ours, &["pid", "shared"]).expect("A's plugins");
    let _small = SmallDisk::mount(&lab.path("dst-images"), "16m");
    let addr = format!("127.0.0.1:{}", 23000 + (std::process::id() % 17000));
    let _serve = serve_listening(&lab, &addr, false, None);
    let pid = w.pid().to_string();
    let (code, v) = check(&lab, &ours, &["pid", &pid, "--to", &addr, "--insecure-loopback"]);
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["result"], "FAIL");
    let fs = line(&v, "destination", "fs-driver");
    assert_eq!(fs["level"], "FAIL");
    assert!(fs["message"].as_str().is_some_and(|m| m.contains("no filesystem driver named 'shared'")), "{fs}");
    let space = line(&v, "destination", "free-space");
    assert_eq!(space["level"], "FAIL", "64 MiB of memory into 16 MiB: {space}");
    assert_eq!(line(&v, "source", "fs-driver")["level"], "OK");
    probe_ok(&w, w.pid());
}

#[test]
fn check_over_a_handed_in_descriptor() {
    let lab = lab("check-fd");
    let (a, b) = UnixStream::pair().expect("socketpair");
    let p = lab.plugins.display().to_string();
    let img = lab.path("dst-images").display().to_string();
    let mut serve_cmd =
        lab.b().command(&lab.phaul, ["--plugins", p.as_str(), "serve", "--fdrpc", "3", "--img-path", &img]);
    serve_cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let serve = spawn_with_fds(serve_cmd, &[(b.as_fd(), 3)]).expect("serve");
    drop(b);
    let mut check_cmd = lab.a().command(&lab.phaul, ["--plugins", p.as_str(), "check", "--fdrpc", "3", "--json"]);
    check_cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let checker = spawn_with_fds(check_cmd, &[(a.as_fd(), 3)]).expect("check");
    drop(a);
    let out = phaul_testbed::collect(checker, Duration::from_secs(60), "check").expect("check ran");
    let served = phaul_testbed::collect(serve, Duration::from_secs(30), "serve").expect("serve ran");
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", out.stdout, out.stderr));
    assert_eq!(line(&v, "destination", "criu")["level"], "OK", "{v:#}");
    assert_eq!(line(&v, "destination", "cpu")["level"], "OK", "{v:#}");
    assert!(served.status.success(), "serve --fdrpc answered and exited: {}", served.stderr);
}
