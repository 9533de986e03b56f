//! phaul-core as a library: the embedding example (`phaul-core/examples/embed.rs`) is built and run; it drives
//! both halves of a real migration (the real CRIU) over socket pairs it made, with a callback for the events.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use phaul_testbed::fault::wait_until;
use phaul_testbed::{pid_alive, write_plugins_toml};

/// Kills the restored workload (the example's, so this test's) when the test ends, however it ends.
struct Restored(Option<i32>);

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(p) = self.0.filter(|p| *p > 1) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn example() -> PathBuf {
    let lab_phaul = phaul_testbed::locate_binary("phaul").expect("phaul binary");
    let bin = lab_phaul.parent().expect("target dir").join("examples/embed");
    if !bin.exists() {
        // `cargo test --workspace` builds the examples; a narrower run may not have.
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "phaul-core", "--example", "embed"])
            .status()
            .expect("cargo build --example embed");
        assert!(st.success());
    }
    bin
}

#[test]
fn the_embedding_example_migrates_a_workload_and_reports_its_events() {
    let lab = lab("embed");
    let plugins = lab.path("embed-plugins.toml");
    write_plugins_toml(&plugins, &["pid", "shared"]).expect("plugins.toml");
    let work = lab.path("embed-work");
    let out = Command::new(example())
        .args(["--plugins", &plugins.display().to_string(), "--work", &work.display().to_string()])
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let restored: Option<i32> =
        std::fs::read_to_string(work.join("restored.pid")).ok().and_then(|s| s.trim().parse().ok());
    let _guard = Restored(restored);
    assert!(out.status.success(), "the example failed:\n{stdout}\n{stderr}");
    for line in ["event phase final-dump", "event phase restore", "event state committing", "event state migrated"] {
        assert!(stdout.contains(line), "the callback saw `{line}`:\n{stdout}");
    }
    assert!(stdout.contains(": migrated"), "the report:\n{stdout}");
    let pid = restored.unwrap_or_else(|| panic!("no restored pid:\n{stdout}\n{stderr}"));
    assert!(pid_alive(pid), "the restored workload runs");
    let count = || std::fs::read_to_string(work.join("counter")).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let now = count().expect("counter");
    assert!(wait_until(Duration::from_secs(10), || count().is_some_and(|c| c > now)), "the counter goes on");
}
