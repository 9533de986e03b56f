//! Failure paths: whatever goes wrong before the destination confirms a restore, the workload keeps running on
//! the source with its state intact, nothing of it is left on the destination, and the error says what happened.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use phaul_testbed::{locate_binary, write_plugins_toml, MigrateOptions};

fn find_file_with_prefix(dir: &Path, prefix: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file_with_prefix(&p, prefix) {
                return Some(f);
            }
        } else if e.file_name().to_string_lossy().starts_with(prefix) {
            return Some(p);
        }
    }
    None
}

/// A `while_running` hook: as soon as the destination's page server starts writing pages under `dst_images`,
/// SIGKILL the process `victim` names (given `phaul serve`'s pid), and record that it did.
fn kill_when_pages_arrive(
    dst_images: PathBuf,
    killed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    victim: impl Fn(u32) -> Option<i32> + Send + 'static,
) -> Box<dyn FnOnce(u32) + Send> {
    Box::new(move |serve_pid| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if find_file_with_prefix(&dst_images, "pages-").is_some() {
                if let Some(pid) = victim(serve_pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    killed.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn destination_refuses_an_unknown_host_type() {
    let lab = lab("refuse");
    let w = lab.start_workload("counter", &[]).expect("start");
    // The destination knows no `pid` host type.
    let dst_plugins = lab.path("dst-plugins.toml");
    write_plugins_toml(&dst_plugins, &["shared"]).expect("plugins");
    let run =
        lab.migrate(w.pid(), MigrateOptions { dst_plugins: Some(dst_plugins), ..Default::default() }).expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("no host type named 'pid' is installed and enabled"), "{}", run.describe());
    assert!(run.src_stderr.contains("keeps running on this host"), "{}", run.describe());
}

#[test]
fn destination_dies_mid_transfer() {
    let lab = lab("dstdies");
    let w = lab.start_workload("memory", &["--size-mib", "256"]).expect("start");
    let before = probe_ok(&w, w.pid());
    let dst_images = lab.path("dst-images");
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let k = killed.clone();
    let opts = MigrateOptions {
        // As soon as the destination's page server starts writing pages, kill `phaul serve` outright.
        while_running: Some(kill_when_pages_arrive(dst_images, k, |serve_pid| Some(serve_pid as i32))),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).expect("run");
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst), "the destination was never killed:\n{}", run.describe());
    assert_still_on_source(&lab, &w, &run);
    let after = probe_ok(&w, w.pid());
    assert_eq!(after["actual_checksum"], before["expected_checksum"]);
    let report = run.report.expect("a report even on failure");
    let err = report["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("closed") || err.contains("lost") || err.contains("failed"), "{err}");
    // The source's images stay for inspection.
    assert!(report["images_kept"].as_bool().unwrap_or(false), "{report}");
}

#[test]
fn restore_fails_on_the_destination_when_a_held_file_is_missing() {
    let lab = lab("rstfail");
    let file = lab.path("held.log");
    let moved = lab.path("held.log.moved");
    let w = lab.start_workload("file-append", &["--file", &file.display().to_string()]).expect("start");
    // The sample external caller plays the filesystem-moving program; on the frozen sync it "forgets" the file
    // the workload holds open, so the destination's CRIU cannot find it.
    let caller = locate_binary("phaul-external-caller").expect("caller binary");
    let sync = format!("if [ \"$PHAUL_SYNC_FROZEN\" = 1 ]; then mv '{}' '{}'; fi", file.display(), moved.display());
    let opts = MigrateOptions { src_wrapper: Some((caller, vec!["--on-sync".into(), sync])), ..Default::default() };
    let run = lab.migrate(w.pid(), opts).expect("run");
    // Put the file back where the workload's own check looks for it, then check nothing was lost.
    std::fs::rename(&moved, &file).expect("the caller moved the file");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("CRIU RESTORE failed"), "{}", run.describe());
    // CRIU's own error lines travel back to the source's error message.
    assert!(run.src_stderr.contains("Error ("), "{}", run.describe());
    let n = u64_of(&probe_ok(&w, w.pid()), "lines_written");
    w.wait_state("more lines", Duration::from_secs(10), |s| s["lines_written"].as_u64() > Some(n + 2))
        .expect("the workload keeps appending on the source");
}

#[test]
fn a_panicking_plugin_becomes_an_error_and_the_workload_is_untouched() {
    let lab = lab("panic");
    let w = lab.start_workload("counter", &[]).expect("start");
    let plugins = lab.path("panic-plugins.toml");
    let dir = locate_binary("phaul").expect("phaul").parent().expect("dir").to_path_buf();
    std::fs::write(
        &plugins,
        format!(
            "[[plugin]]\npath = \"{}\"\n[[plugin]]\npath = \"{}\"\n[host-type.panicky]\nfs = \"shared\"\n",
            dir.join("libphaul_fixture_plugin_panics.so").display(),
            dir.join("libphaul_fs_shared.so").display()
        ),
    )
    .expect("write");
    let p = plugins.display().to_string();
    let out = lab
        .phaul(&["--plugins", &p, "migrate", "panicky", "1", "--to", "127.0.0.1:1", "--insecure-loopback"], &[])
        .expect("run");
    // phaul did not abort (that would be signal 6, no exit code): it failed cleanly with the panic's message.
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("the plugin panicked in root_pid: deliberate panic from the test fixture"),
        "{}",
        out.stderr
    );
    probe_ok(&w, w.pid());
}

/// The source's phaul is killed while CRIU streams pages: CRIU cannot report its dump to anyone, so it resumes the
/// tree; the destination sees the control channel close and rolls back.
#[test]
fn source_phaul_dies_mid_transfer() {
    let lab = lab("srcdies");
    let w = lab.start_workload("memory", &["--size-mib", "256"]).expect("start");
    let before = probe_ok(&w, w.pid());
    let dst_images = lab.path("dst-images");
    let netns_a = lab.a().netns_inode().expect("netns A");
    let workload = w.pid();
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let k = killed.clone();
    let opts = MigrateOptions {
        // `phaul migrate` is the process in host A whose command line names the workload's pid.
        while_running: Some(kill_when_pages_arrive(dst_images, k, move |_serve| {
            let me = format!("{workload}");
            phaul_testbed::pids_in_netns(netns_a).unwrap_or_default().into_iter().find(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> =
                    cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                args.iter().any(|a| a == "migrate") && args.contains(&me)
            })
        })),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).expect("run");
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst), "phaul migrate was never killed:\n{}", run.describe());
    // CRIU notices at its next notification and resumes the tree; give it a moment.
    let after = w
        .wait_state("the resumed workload to count again", Duration::from_secs(30), |s| {
            s["counter"].as_u64() > before["counter"].as_u64().map(|c| c + 5)
        })
        .expect("the workload runs on A again");
    assert!(phaul_testbed::pid_alive(w.pid()));
    let _ = after;
    assert_still_on_source(&lab, &w, &run);
    assert_eq!(probe_ok(&w, w.pid())["actual_checksum"], before["expected_checksum"]);
    assert!(!run.dst_status.success(), "the destination must report the roll-back:\n{}", run.describe());
}

#[test]
fn a_destination_without_room_for_the_images_refuses_before_anything_is_frozen() {
    let lab = lab("nospace");
    let w = lab.start_workload("memory", &["--size-mib", "64"]).expect("start");
    let before = probe_ok(&w, w.pid());
    // B's image directory has 16 MiB; the workload holds 64 MiB.
    let _small = SmallDisk::mount(&lab.path("dst-images"), "16m");
    let run = lab.migrate(w.pid(), MigrateOptions::default()).expect("run");
    assert_still_on_source(&lab, &w, &run);
    let err = &run.src_stderr;
    assert!(err.contains("MiB free under") && err.contains("of images"), "the numbers are given:\n{}", run.describe());
    let report = run.report.expect("a report");
    assert!(report["frozen_ms"].is_null(), "nothing was frozen: {report}");
    let after = probe_ok(&w, w.pid());
    assert_eq!(after["actual_checksum"], before["expected_checksum"]);
}
