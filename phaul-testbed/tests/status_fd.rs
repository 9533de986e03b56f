//! `phaul migrate --status-fd N`: the JSON status lines a container manager reads while a migration runs (schema
//! phaul-status/1, docs/status-fd.md), from real migrations with the real CRIU.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use common::*;
use phaul_testbed::fault::{kill_at, Side};
use phaul_testbed::MigrateOptions;
use serde_json::Value;

/// Runs the source through `sh`, which opens descriptor 7 on `file` for it; `--status-fd 7`.
fn with_status_fd(opts: &mut MigrateOptions, file: &Path) {
    let script = format!("shift; exec \"$@\" 7>'{}'", file.display());
    opts.src_wrapper = Some((PathBuf::from("/bin/sh"), vec!["-c".into(), script, "sh".into()]));
    opts.src_args.extend(["--status-fd".into(), "7".into()]);
}

/// Every line parsed; each has the schema, a time that never goes back, and an event name.
fn lines(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut t = 0.0;
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            assert_eq!(v["schema"], "phaul-status/1", "{l}");
            let now = v["t"].as_f64().unwrap_or_else(|| panic!("no t: {l}"));
            assert!(now >= t, "time went back: {l}");
            t = now;
            assert!(v["event"].is_string(), "{l}");
            v
        })
        .collect()
}

fn of<'a>(events: &'a [Value], event: &str, key: &str) -> Vec<&'a str> {
    events.iter().filter(|e| e["event"] == event).filter_map(|e| e[key].as_str()).collect()
}

#[test]
fn status_lines_follow_a_migration_from_setup_to_the_report() {
    let lab = lab("status");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let file = lab.path("status.jsonl");
    let mut opts = MigrateOptions::default();
    with_status_fd(&mut opts, &file);
    migrate_and_check(&lab, &mut w, opts);
    let events = lines(&file);
    if std::env::var_os("PHAUL_SHOW_STATUS").is_some() {
        eprintln!("{}", std::fs::read_to_string(&file).unwrap_or_default());
    }
    let phases = of(&events, "phase", "phase");
    let order = ["setup", "final-dump", "images", "restore", "commit"];
    let mut at = 0;
    for p in order {
        let i = phases.iter().skip(at).position(|q| *q == p).unwrap_or_else(|| panic!("no {p} after {at}: {phases:?}"));
        at += i;
    }
    let states = of(&events, "state", "state");
    for s in ["frozen", "committing", "committed", "migrated"] {
        assert!(states.contains(&s), "state {s}: {states:?}");
    }
    let plan = events.iter().find(|e| e["event"] == "plan").expect("the plan");
    assert!(plan["expected_image_bytes"].as_u64() > Some(0) && plan["htype"] == "pid", "{plan}");
    let dump = events.iter().find(|e| e["event"] == "round" && e["kind"] == "dump").expect("the final dump's round");
    assert!(dump["bytes"].as_u64() > Some(0) && dump["rate_bytes_s"].as_f64().is_some(), "{dump}");
    let fs: Vec<&Value> = events.iter().filter(|e| e["event"] == "fs_round").collect();
    assert!(fs.last().is_some_and(|f| f["frozen"] == true), "the frozen filesystem round: {fs:?}");
    let end = events.last().expect("lines");
    assert_eq!(end["event"], "end", "the last line is the end: {end}");
    assert_eq!(end["outcome"], "migrated", "{end}");
    assert_eq!(end["error"], Value::Null, "{end}");
    assert_eq!(end["report"]["outcome"], "migrated", "the report rides on the end line: {end}");
    assert!(end["report"]["frozen_ms"].as_f64().is_some(), "{end}");
}

#[test]
fn a_rolled_back_migration_says_so_on_the_status_descriptor() {
    let lab = lab("status-rb");
    let w = lab.start_workload("counter", &[]).expect("start");
    let file = lab.path("status.jsonl");
    let mut opts = MigrateOptions::default();
    with_status_fd(&mut opts, &file);
    kill_at(&mut opts, "dst:notify:post-restore", Side::Dst, lab.path("fault.json"));
    let run = lab.migrate(w.pid(), opts).expect("migration ran");
    assert_still_on_source(&lab, &w, &run);
    let events = lines(&file);
    let states = of(&events, "state", "state");
    assert!(states.contains(&"frozen") && states.contains(&"rolled-back"), "{states:?}");
    assert!(!states.contains(&"committing"), "nothing was committed: {states:?}");
    let end = events.last().expect("lines");
    assert_eq!(end["outcome"], "rolled-back", "{end}");
    assert!(end["error"].as_str().is_some_and(|e| !e.is_empty()), "the error rides on the end line: {end}");
}

#[test]
fn a_status_descriptor_that_is_not_open_is_refused_before_anything_starts() {
    let lab = lab("status-bad");
    let w = lab.start_workload("counter", &[]).expect("start");
    let mut opts = MigrateOptions::default();
    opts.src_args.extend(["--status-fd".into(), "9".into()]);
    let run = lab.migrate(w.pid(), opts).expect("migration ran");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("--status-fd 9: descriptor 9 is not open"), "{}", run.describe());
    let mut opts = MigrateOptions::default();
    opts.src_args.extend(["--status-fd".into(), "3".into()]);
    let run = lab.migrate(w.pid(), opts).expect("migration ran");
    assert!(run.src_stderr.contains("--status-fd 3 is also a channel descriptor"), "{}", run.describe());
}

/// A reader that never reads (a FIFO with a one-page buffer) does not hold the migration up: the engine never
/// waits for the status descriptor, and phaul gives the last lines at most a few seconds at the end.
#[test]
fn a_reader_that_never_reads_does_not_stall_the_migration() {
    use std::os::fd::AsRawFd;
    let lab = lab("status-stall");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let fifo = lab.path("status.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Our end, opened first (without blocking) and never read until the migration is over.
    let reader =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(&fifo).expect("open the FIFO");
    let _ = nix::fcntl::fcntl(reader.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096));
    let mut opts = MigrateOptions::default();
    with_status_fd(&mut opts, &fifo);
    let t = std::time::Instant::now();
    migrate_and_check(&lab, &mut w, opts);
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "the migration took {:?}", t.elapsed());
    drop(reader);
}

/// On a terminal, `phaul migrate` shows its progress as an indicatif spinner line (the elapsed time, the phase);
/// `script` gives the source a terminal.
#[test]
fn on_a_terminal_the_progress_is_a_spinner_line() {
    let lab = lab("status-tty");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let typescript = lab.path("typescript");
    // script runs the command in a shell on a new pty; the channel descriptors pass through it.
    let script = format!(
        "shift; cmd=''; for a in \"$@\"; do cmd=\"$cmd '$a'\"; done; exec script -qfe -c \"$cmd\" '{}' >/dev/null",
        typescript.display()
    );
    let opts = MigrateOptions {
        human_report: true,
        src_wrapper: Some((std::path::PathBuf::from("/bin/sh"), vec!["-c".into(), script, "sh".into()])),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).expect("migration ran");
    let seen = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert!(run.succeeded(), "{}\n{seen}", run.describe());
    let restored = run.restored_pid.expect("restored pid");
    w.adopt_pid(restored).expect("adopt");
    assert!(
        seen.contains("[00:00:0") && seen.contains("final dump"),
        "the spinner line with elapsed time and phase:\n{seen}"
    );
}
