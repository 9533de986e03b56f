//! The demo: a live migration of a sample workload between two local "hosts" (network namespaces joined by a veth
//! pair), over three real TCP connections between them, with phaul's report. Run it as root after scripts/setup,
//! or simply through scripts/demo.
//!
//! The workload holds 256 MiB of memory filled with a known pattern and counts. phaul moves it from host A to
//! host B; the demo then checks on B that its memory checksum is unchanged, its counter kept counting from where
//! it was, it lives in B's network namespace, and the source process is gone.

use std::process::ExitCode;
use std::time::Duration;

use phaul_testbed::{netns_of_pid, pid_alive, state_ok, wait_pid_gone, Lab, MigrateOptions, PROBE_TIMEOUT};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    v.get(k).unwrap_or(&serde_json::Value::Null)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let size: u32 = std::env::var("PHAUL_DEMO_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let lab = Lab::new("demo")?;
    println!(
        "demo: host A = netns {} ({}), host B = netns {} ({})",
        lab.a().name(),
        lab.a().addr(),
        lab.b().name(),
        lab.b().addr()
    );
    let mut w = lab.start_workload("memory", &["--size-mib", &size.to_string()])?;
    let before = w.probe(PROBE_TIMEOUT)?;
    state_ok(&before)?;
    println!(
        "demo: workload pid {} on A: {} MiB, checksum {}, counter {}",
        w.pid(),
        size,
        field(&before, "expected_checksum"),
        field(&before, "counter")
    );
    println!("demo: migrating A -> B over TCP (control, memory and filesystem channels handed to phaul as fds)\n");
    let run = lab.migrate(w.pid(), MigrateOptions { human_report: true, ..Default::default() })?;
    print!("{}", run.src_stdout);
    if !run.succeeded() {
        return Err(format!("the migration failed:\n{}", run.describe()).into());
    }
    let rpid = run.restored_pid.ok_or("phaul did not write the restored pid")?;
    w.adopt_pid(rpid)?;
    let gone = wait_pid_gone(w.pid(), Duration::from_secs(10));
    let after = w.probe_pid(rpid, PROBE_TIMEOUT)?;
    state_ok(&after)?;
    let in_b = netns_of_pid(rpid)? == lab.b().netns_inode()?;
    let c0 = field(&before, "counter").as_u64().unwrap_or(0);
    let c1 = field(&after, "counter").as_u64().unwrap_or(0);
    println!();
    println!("demo: on B: pid {rpid}, in B's network namespace: {in_b}");
    println!(
        "demo: memory checksum {} (expected {})",
        field(&after, "actual_checksum"),
        field(&before, "expected_checksum")
    );
    println!("demo: counter {c0} before, {c1} after: it kept counting");
    println!("demo: source pid {} gone from A: {}", w.pid(), gone && !pid_alive(w.pid()));
    if !(in_b && gone && c1 > c0 && field(&after, "actual_checksum") == field(&before, "expected_checksum")) {
        return Err("the workload did not arrive intact".into());
    }
    println!("demo: OK");
    Ok(())
}
