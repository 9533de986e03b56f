//! The `btrfs` filesystem driver, end to end, on real btrfs: each host has its own btrfs filesystem on a loop
//! device. Host A's holds the workload's subvolume; host B's is mounted at the same path inside the destination's
//! own mount namespace (so B receives into its own filesystem at the path the workload uses, as a second machine
//! would), and the restored workload inherits that namespace.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use phaul_testbed::fault::{kill_at, wait_until, Side};
use phaul_testbed::storage::LoopBtrfs;
use phaul_testbed::{pid_alive, write_plugins_toml, Lab, MigrateOptions, MigrationRun, Workload};
use serde_json::Value;

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn subvolumes(fs: &LoopBtrfs) -> Vec<String> {
    fs.subvolumes().unwrap_or_else(|e| panic!("{e}"))
}

/// Host A's filesystem with the workload's subvolume `ct` (and 8 MiB of bulk data), host B's filesystem.
struct BtrfsLab {
    plugins: PathBuf,
    a: LoopBtrfs,
    b: LoopBtrfs,
    // Dropped last: the filesystems go after the lab's processes.
    lab: Lab,
}

impl BtrfsLab {
    fn new(tag: &str, b_mib: u64) -> BtrfsLab {
        let lab = lab(tag);
        let plugins = lab.path("plugins-btrfs.toml");
        write_plugins_toml(&plugins, &["pid", "btrfs"]).expect("plugins.toml");
        let a = LoopBtrfs::new(&lab.path("a.img"), &lab.path("btrfs-a"), 512).expect("A's btrfs");
        let b = LoopBtrfs::new(&lab.path("b.img"), &lab.path("btrfs-b"), b_mib).expect("B's btrfs");
        let ct = a.create_subvolume("ct").expect("subvolume");
        std::fs::create_dir_all(ct.join("bulk")).expect("bulk");
        let mut blob = vec![0u8; 8 << 20];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for v in blob.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x as u8;
        }
        std::fs::write(ct.join("bulk/blob"), &blob).expect("bulk data");
        BtrfsLab { plugins, a, b, lab }
    }

    fn ct(&self) -> PathBuf {
        self.a.dir.join("ct")
    }

    fn start(&self) -> Workload {
        let dir = self.ct().display().to_string();
        self.lab.start_workload("tree-writer", &["--dir", &dir]).expect("tree-writer")
    }

    fn options(&self) -> MigrateOptions {
        let script = format!(
            "mount --bind '{}' '{}' || exit 97; shift; exec \"$@\"",
            self.b.dir.display(),
            self.a.dir.display()
        );
        let wrapper = ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script, "sh"];
        MigrateOptions {
            src_args: vec![
                "--fs".into(),
                "btrfs".into(),
                "--htype-opt".into(),
                format!("root={}", self.ct().display()),
            ],
            dst_args: vec!["--fs-opt".into(), format!("btrfs:allow={}", self.a.dir.display())],
            src_plugins: Some(self.plugins.clone()),
            dst_plugins: Some(self.plugins.clone()),
            dst_wrapper: Some((PathBuf::from("/usr/bin/unshare"), wrapper.iter().map(|s| s.to_string()).collect())),
            ..Default::default()
        }
    }

    /// Nothing but the workload's subvolume on either filesystem, and nothing else at B's top.
    fn assert_no_snapshots(&self, run: &MigrationRun, b_has_ct: bool) {
        assert_eq!(subvolumes(&self.a), vec!["ct".to_string()], "snapshots left on A:\n{}", run.describe());
        let want: Vec<String> = if b_has_ct { vec!["ct".into()] } else { vec![] };
        assert_eq!(subvolumes(&self.b), want, "snapshots left on B:\n{}", run.describe());
        assert_eq!(names(&self.b.dir), want, "B's filesystem keeps something:\n{}", run.describe());
    }
}

fn report(run: &MigrationRun) -> Value {
    run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()))
}

#[test]
fn btrfs_sends_snapshots_in_rounds_and_b_ends_with_a_writable_subvolume_equal_to_a_at_the_freeze() {
    let bl = BtrfsLab::new("btrfs-ok", 512);
    let mut w = bl.start();
    assert!(wait_until(Duration::from_secs(10), || w.state().is_ok_and(|s| s["tree_ops"].as_u64() > Some(12))));
    let mut opts = bl.options();
    let compared = compare_at_restore_reply(&mut opts, bl.lab.path("fault-restored"), bl.ct(), bl.b.dir.join("ct"));
    let m = migrate_and_check(&bl.lab, &mut w, opts);
    assert_trees_equal(&compared, &m.run);
    // The workload writes on in B's subvolume, which is writable and unmarked; A's stays, marked.
    let b_ct = bl.b.dir.join("ct");
    let ops = u64_of(&m.after, "tree_ops");
    let later = w
        .wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 5))
        .unwrap_or_else(|e| panic!("the workload stopped writing in B: {e}"));
    let newest = format!("n{}", u64_of(&later, "tree_ops") - 1);
    assert!(
        wait_until(Duration::from_secs(5), || b_ct.join("data").join(&newest).exists()),
        "B's subvolume has no {newest}"
    );
    assert!(!bl.ct().join("data").join(&newest).exists(), "the restored workload wrote into A's subvolume");
    assert_eq!(sh("btrfs", &["property", "get", "-ts", &b_ct.display().to_string(), "ro"]), "ro=false");
    assert_eq!(mark(&b_ct), None);
    assert_eq!(mark(&bl.ct()).as_deref(), Some("migrated-away"));
    bl.assert_no_snapshots(&m.run, true);

    let r = report(&m.run);
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("no fs_round_list: {r}"));
    let (last, live) = rounds.split_last().unwrap_or_else(|| panic!("no rounds: {r}"));
    assert_eq!(last["frozen"], true, "{r}");
    assert!(live.len() >= 2, "8 MiB in round 1 calls for a second live round: {r}");
    assert!(live[0]["bytes"].as_u64() >= Some(8 << 20), "round 1 sent the whole subvolume: {r}");
    assert!(last["bytes"].as_u64() < Some(1 << 20), "the frozen round sends only the last delta: {r}");
}

#[test]
fn a_destination_killed_in_round_2_leaves_the_workload_on_a_and_no_snapshot_on_a() {
    let bl = BtrfsLab::new("btrfs-kill", 512);
    let w = bl.start();
    let mut opts = bl.options();
    kill_at(&mut opts, "dst:recv:FsRoundStart#2", Side::Dst, bl.lab.path("fault"));
    let run = bl.lab.migrate(w.pid(), opts).expect("run");
    assert!(bl.lab.path("fault").exists(), "the destination never reached round 2:\n{}", run.describe());
    assert_still_on_source(&bl.lab, &w, &run);
    assert_eq!(subvolumes(&bl.a), vec!["ct".to_string()], "the source's snapshots stay:\n{}", run.describe());
    assert_eq!(mark(&bl.ct()), None);
    // SIGKILLed, the destination could not clean up: what it received carries its receiving mark.
    let left = names(&bl.b.dir);
    assert!(left.iter().any(|n| n == "ct"), "{left:?}");
    assert!(mark(&bl.b.dir.join("ct")).is_some_and(|m| m.starts_with("receiving ")));
    // The next run takes the leftover target and succeeds.
    let mut w = w;
    let done = migrate_and_check(&bl.lab, &mut w, bl.options());
    assert!(done.run.succeeded());
    assert_eq!(mark(&bl.b.dir.join("ct")), None);
}

#[test]
fn a_full_destination_fails_before_the_freeze_and_b_is_cleaned() {
    // 8 MiB of bulk data and tree-writer's files into a filesystem too small for them.
    let bl = BtrfsLab::new("btrfs-full", 120);
    let filler = bl.b.dir.join("filler");
    // Leave B less room than round 1 needs (a file that is not phaul's, at B's top: it stays).
    let _ =
        Command::new("dd").args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=1M", "count=200"]).output();
    let _ = Command::new("sync").status();
    let w = bl.start();
    let run = bl.lab.migrate(w.pid(), bl.options()).expect("run");
    assert_still_on_source(&bl.lab, &w, &run);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(all.contains("No space left on device"), "the error does not say B is full:\n{}", run.describe());
    assert_eq!(report(&run)["frozen_ms"].as_f64().unwrap_or(0.0), 0.0, "frozen for a round that could not fit");
    assert_eq!(subvolumes(&bl.a), vec!["ct".to_string()]);
    assert_eq!(subvolumes(&bl.b), Vec::<String>::new(), "snapshots left on B:\n{}", run.describe());
    assert_eq!(names(&bl.b.dir), vec!["filler".to_string()], "B keeps what it received");
}

#[test]
fn a_root_that_is_not_a_subvolume_a_missing_btrfs_and_a_return_trip_are_refused_with_what_to_do() {
    let bl = BtrfsLab::new("btrfs-refused", 512);
    // A plain directory on btrfs.
    let plain = bl.a.dir.join("plain");
    std::fs::create_dir_all(&plain).expect("plain dir");
    let dir = plain.display().to_string();
    let w = bl.lab.start_workload("tree-writer", &["--dir", &dir]).expect("tree-writer");
    let mut opts = bl.options();
    opts.src_args = vec!["--fs".into(), "btrfs".into(), "--htype-opt".into(), format!("root={dir}")];
    let run = bl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&bl.lab, &w, &run);
    assert!(run.src_stderr.contains("is not a btrfs subvolume"), "{}", run.describe());
    assert!(run.src_stderr.contains("--fs rsync"), "the refusal does not say what to do:\n{}", run.describe());
    drop(w);

    // No btrfs program on either host (an operator's wrong path): named, before anything is taken.
    let mut w = bl.start();
    for (flag, value) in [("src", "btrfs=/nonexistent/btrfs"), ("dst", "btrfs:btrfs=/nonexistent/btrfs")] {
        let mut opts = bl.options();
        let args = if flag == "src" { &mut opts.src_args } else { &mut opts.dst_args };
        args.extend(["--fs-opt".into(), value.into()]);
        let run = bl.lab.migrate(w.pid(), opts).expect("run");
        assert_still_on_source(&bl.lab, &w, &run);
        assert!(format!("{}{}", run.src_stderr, run.dst_stderr).contains("/nonexistent/btrfs"), "{}", run.describe());
        bl.assert_no_snapshots(&run, false);
    }

    // There and back: the way back finds the subvolume the workload left, and says how to proceed.
    let there = migrate_and_check(&bl.lab, &mut w, bl.options());
    let mut back = bl.options();
    back.reverse = true;
    back.dst_wrapper = None;
    back.src_wrapper =
        Some((PathBuf::from("/usr/bin/nsenter"), vec![format!("--mount=/proc/{}/ns/mnt", there.restored)]));
    let run = bl.lab.migrate(there.restored, back).expect("run");
    assert!(!run.src_status.success(), "the return trip claims success:\n{}", run.describe());
    assert!(pid_alive(there.restored), "the workload died on B:\n{}", run.describe());
    probe_ok(&w, there.restored);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(all.contains("migrated away") && all.contains("btrfs subvolume delete"), "{}", run.describe());
    assert_eq!(mark(&bl.ct()).as_deref(), Some("migrated-away"), "A's old subvolume lost its mark");
    assert!(bl.ct().join("bulk/blob").exists(), "A's old subvolume was touched");
}

#[test]
fn a_destination_killed_in_the_frozen_round_leaves_the_workload_running_on_a() {
    let bl = BtrfsLab::new("btrfs-kill-final", 512);
    let w = bl.start();
    let mut opts = bl.options();
    kill_at(&mut opts, "dst:step:final-fs-round", Side::Dst, bl.lab.path("fault"));
    let run = bl.lab.migrate(w.pid(), opts).expect("run");
    assert!(bl.lab.path("fault").exists(), "the destination never reached its final round:\n{}", run.describe());
    assert_still_on_source(&bl.lab, &w, &run);
    let ops = u64_of(&w.state().expect("state"), "tree_ops");
    w.wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 3))
        .unwrap_or_else(|e| panic!("the workload does not run on A after the roll-back: {e}"));
    assert_eq!(subvolumes(&bl.a), vec!["ct".to_string()], "the source's snapshots stay:\n{}", run.describe());
    assert!(bl.ct().join("bulk/blob").exists(), "A's subvolume was damaged");
}

#[test]
fn restart_mode_with_btrfs_moves_the_subvolume_and_starts_the_workload_on_it_in_b() {
    // The `cmd` fixture host type (a shell counter stopped and started by signals and `sh -c`) with its state
    // directory, the subvolume, as the filesystem root.
    let bl = BtrfsLab::new("btrfs-restart", 512);
    let plugins = bl.lab.path("plugins-cmd-btrfs.toml");
    write_plugins_toml(&plugins, &["cmd", "btrfs"]).expect("plugins.toml");
    let ct = bl.ct();
    let mut w = CmdWorkload::start_in(&bl.lab, &ct, &ct, &[]);
    let old = w.pids[0];
    let mut opts = bl.options();
    opts.src_plugins = Some(plugins.clone());
    opts.dst_plugins = Some(plugins);
    opts.target = Some(("cmd".into(), "counter".into()));
    opts.src_args = vec![
        "--mode".into(),
        "restart".into(),
        "--htype-opt".into(),
        format!("dir={}", ct.display()),
        "--fs".into(),
        "btrfs".into(),
    ];
    let run = bl.lab.migrate(old, opts).expect("run");
    assert!(run.succeeded(), "restart mode with btrfs failed:\n{}", run.describe());
    let before = w.count();
    // On B the counter runs in the destination's mount namespace, on B's subvolume.
    let mut on_b = CmdWorkload { dir: bl.b.dir.join("ct"), pids: Vec::new() };
    let new =
        on_b.wait_new_pid(old, Duration::from_secs(10)).unwrap_or_else(|| panic!("no new pid:\n{}", run.describe()));
    w.pids.push(new);
    on_b.assert_counts_in(new, bl.lab.b().netns_inode().expect("netns of B"), before, "in host B on B's subvolume");
    assert!(!pid_alive(old), "the workload still runs on A");
    assert_eq!(w.count(), before, "A's files changed after the stop");
    assert_eq!(mark(&bl.ct()).as_deref(), Some("migrated-away"));
    assert_eq!(mark(&bl.b.dir.join("ct")), None);
    let r = report(&run);
    assert_eq!(r["mode"], "restart", "{r}");
    on_b.pids.clear(); // killed through `w`
    drop(w);
    bl.assert_no_snapshots(&run, true);
}
