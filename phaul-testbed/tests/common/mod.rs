//! Shared helpers of the end-to-end tests. Everything here runs the real phaul, the real CRIU (installed by
//! scripts/setup), real network namespaces and real workloads.

#![allow(dead_code)]

use std::time::Duration;

use phaul_testbed::{
    netns_of_pid, pid_alive, pids_in_netns, state_ok, wait_pid_gone, Lab, MigrateOptions, MigrationRun, Workload,
    PROBE_TIMEOUT,
};
use serde_json::Value;

pub fn lab(tag: &str) -> Lab {
    Lab::new(tag).unwrap_or_else(|e| panic!("cannot set up the lab: {e}"))
}

pub fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or_else(|| panic!("state has no number {k}: {v}"))
}

/// Probes the workload and insists its self-check passes.
pub fn probe_ok(w: &Workload, pid: i32) -> Value {
    let v = w.probe_pid(pid, PROBE_TIMEOUT).unwrap_or_else(|e| panic!("probe of pid {pid} failed: {e}"));
    state_ok(&v).unwrap_or_else(|e| panic!("workload state not ok: {e}"));
    v
}

/// What a successful migration left behind.
pub struct Migrated {
    pub run: MigrationRun,
    pub restored: i32,
    pub before: Value,
    pub after: Value,
}

/// Migrates `w` from A to B and asserts what every successful migration must show: both sides exit 0, the
/// source tree is gone from A, the restored tree runs in B's network namespace and passes its self-check, and
/// its counter went on from where it was.
pub fn migrate_and_check(lab: &Lab, w: &mut Workload, opts: MigrateOptions) -> Migrated {
    let before = probe_ok(w, w.pid());
    let run = lab.migrate(w.pid(), opts).unwrap_or_else(|e| panic!("migration did not run: {e}"));
    assert!(run.succeeded(), "migration failed:\n{}", run.describe());
    let restored = run.restored_pid.unwrap_or_else(|| panic!("no restored pid written:\n{}", run.describe()));
    w.adopt_pid(restored).expect("adopt restored pid");
    assert!(wait_pid_gone(w.pid(), Duration::from_secs(10)), "the source tree {} is still alive on A", w.pid());
    assert!(pid_alive(restored), "the restored tree {restored} is not running");
    let b = lab.b().netns_inode().expect("netns of B");
    assert_eq!(netns_of_pid(restored).expect("netns of restored"), b, "the restored tree is not in host B");
    assert!(pids_in_netns(lab.a().netns_inode().expect("netns of A")).expect("pids in A").is_empty());
    let after = probe_ok(w, restored);
    assert!(
        u64_of(&after, "counter") >= u64_of(&before, "counter"),
        "the counter restarted: {} before, {} after",
        u64_of(&before, "counter"),
        u64_of(&after, "counter")
    );
    let report = run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()));
    assert_eq!(report["outcome"], "migrated", "{report}");
    assert_eq!(report["restored_pid"], restored, "{report}");
    Migrated { run, restored, before, after }
}

/// Asserts the workload still runs on A, unharmed, and nothing of it runs on B.
pub fn assert_still_on_source(lab: &Lab, w: &Workload, run: &MigrationRun) {
    assert!(!run.src_status.success(), "the source reported success:\n{}", run.describe());
    assert!(pid_alive(w.pid()), "the workload died on the source:\n{}", run.describe());
    probe_ok(w, w.pid());
    let b = lab.b().netns_inode().expect("netns of B");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = pids_in_netns(b).expect("pids in B");
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "processes left in host B: {left:?}\n{}", run.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(r) = &run.report {
        assert_eq!(r["outcome"], "failed", "{r}");
    }
}

/// A CA and certificates for hosts A and B (valid for their names, loopback and the veth addresses), made with
/// `phaul cert` in the lab's scratch directory.
pub struct Pki {
    pub dir: std::path::PathBuf,
}

impl Pki {
    pub fn new(lab: &Lab) -> Pki {
        let dir = lab.path("pki");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&lab.phaul).args(args).output().expect("phaul cert");
            assert!(out.status.success(), "phaul {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let d = dir.display().to_string();
        run(&["cert", "ca", &d]);
        for h in ["hosta.test", "hostb.test", "mallory.test"] {
            run(&["cert", "host", &d, h, "--ip", "127.0.0.1", "--ip", "10.91.0.1", "--ip", "10.91.0.2"]);
        }
        Pki { dir }
    }

    /// `--tls-cert/--tls-key/--tls-ca` of `host`.
    pub fn args(&self, host: &str) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--tls-cert".into(),
            p(&format!("{host}.pem")),
            "--tls-key".into(),
            p(&format!("{host}.key")),
            "--tls-ca".into(),
            p("ca.pem"),
        ]
    }
}
