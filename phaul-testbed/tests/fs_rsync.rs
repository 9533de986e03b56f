//! The `rsync` filesystem driver, end to end: the real rsync over phaul's filesystem channel, a workload that keeps
//! changing its tree (`tree-writer`), rounds while it runs and an exact last round while it is frozen.
//!
//! Hosts A and B share one kernel and one filesystem here, so B's copy of the tree is a different directory
//! (`tree-b`) that the destination's phaul sees at the source's path: it runs in its own mount namespace with
//! `tree-b` bound over `tree`. The restored workload inherits that namespace, so on B it writes into `tree-b`
//! through the same path it used on A, as it would on a second machine.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use phaul_testbed::fault::{kill_at, wait_until, Side};
use phaul_testbed::{pid_alive, write_plugins_toml, Lab, MigrateOptions, MigrationRun, Workload};
use serde_json::Value;

/// A lab with the pid host type and the rsync driver, the workload's tree in A (with 8 MiB of bulk data so that
/// the first round is long enough to need a second) and B's empty directory.
struct FsLab {
    lab: Lab,
    plugins: PathBuf,
    tree: PathBuf,
    tree_b: PathBuf,
}

impl FsLab {
    fn new(tag: &str) -> FsLab {
        let lab = lab(tag);
        let plugins = lab.path("plugins-rsync.toml");
        write_plugins_toml(&plugins, &["pid", "rsync"]).expect("plugins.toml");
        let tree = lab.path("tree");
        let tree_b = lab.path("tree-b");
        std::fs::create_dir_all(tree.join("bulk")).expect("tree");
        std::fs::create_dir_all(&tree_b).expect("tree-b");
        let mut blob = vec![0u8; 8 << 20];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for b in blob.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(tree.join("bulk/blob"), &blob).expect("bulk data");
        FsLab { lab, plugins, tree, tree_b }
    }

    fn start(&self) -> Workload {
        let dir = self.tree.display().to_string();
        self.lab.start_workload("tree-writer", &["--dir", &dir]).expect("tree-writer")
    }

    /// The destination's phaul in its own mount namespace with `tree-b` at the tree's path.
    fn dst_wrapper(&self) -> (PathBuf, Vec<String>) {
        let script = format!(
            "mount --bind '{}' '{}' || exit 97; shift; exec \"$@\"",
            self.tree_b.display(),
            self.tree.display()
        );
        let args = ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script, "sh"];
        (PathBuf::from("/usr/bin/unshare"), args.iter().map(|s| s.to_string()).collect())
    }

    fn options(&self) -> MigrateOptions {
        MigrateOptions {
            src_args: vec![
                "--fs".into(),
                "rsync".into(),
                "--htype-opt".into(),
                format!("root={}", self.tree.display()),
            ],
            dst_args: vec!["--fs-opt".into(), format!("rsync:allow={}", self.lab.scratch.path().display())],
            src_plugins: Some(self.plugins.clone()),
            dst_plugins: Some(self.plugins.clone()),
            dst_wrapper: Some(self.dst_wrapper()),
            ..Default::default()
        }
    }
}

fn report(run: &MigrationRun) -> Value {
    run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()))
}

#[test]
fn rsync_moves_the_tree_exactly_and_the_workload_goes_on_writing_in_b() {
    let fl = FsLab::new("rsync-ok");
    let mut w = fl.start();
    assert!(wait_until(Duration::from_secs(10), || w.state().is_ok_and(|s| s["tree_ops"].as_u64() > Some(12))));
    let mut opts = fl.options();
    // Stop the destination just before it reports the restore: the source is frozen and the restored copy is
    // held, so both trees stand still and must be equal, entry by entry.
    let compared =
        compare_at_restore_reply(&mut opts, fl.lab.path("fault-restored"), fl.tree.clone(), fl.tree_b.clone());
    let m = migrate_and_check(&fl.lab, &mut w, opts);
    assert_trees_equal(&compared, &m.run);

    // The workload goes on in B, writing into B's tree; A's tree stays as it was at the freeze.
    let a_after = names(&fl.tree.join("data"));
    let ops = u64_of(&m.after, "tree_ops");
    let later = w
        .wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 5))
        .unwrap_or_else(|e| panic!("the workload stopped writing in B: {e}"));
    state_ok_or_panic(&later);
    let newest = format!("n{}", u64_of(&later, "tree_ops") - 1);
    assert!(
        wait_until(Duration::from_secs(5), || fl.tree_b.join("data").join(&newest).exists()),
        "B's tree has no {newest}: the restored workload does not write into it"
    );
    assert_eq!(names(&fl.tree.join("data")), a_after, "A's tree changed after the migration");
    assert!(!fl.tree.join("data").join(&newest).exists(), "the restored workload wrote into A's tree");

    // Marks: B's tree is the workload's now (no mark); A's says it migrated away (a return trip may use it).
    assert_eq!(mark(&fl.tree_b), None, "B's tree still carries phaul's mark");
    assert_eq!(mark(&fl.tree).as_deref(), Some("migrated-away"));
    assert!(fl.tree.join("bulk/blob").exists(), "phaul deleted the source's data");

    let r = report(&m.run);
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("no fs_round_list: {r}"));
    let (last, live) = rounds.split_last().unwrap_or_else(|| panic!("no filesystem rounds: {r}"));
    assert_eq!(last["frozen"], true, "the last round must run frozen: {r}");
    assert!(live.len() >= 2, "8 MiB in round 1 calls for a second live round: {r}");
    assert!(live.iter().all(|x| x["frozen"] == false), "{r}");
    assert!(live[0]["bytes"].as_u64() >= Some(8 << 20), "round 1 sent the whole tree: {r}");
    assert!(last["bytes"].as_u64() < Some(1 << 20), "the frozen round sends only the last delta, not the tree: {r}");
    assert!(rounds.iter().all(|x| x["duration_ms"].as_f64().is_some()), "{r}");
}

fn state_ok_or_panic(v: &Value) {
    phaul_testbed::state_ok(v).unwrap_or_else(|e| panic!("workload state not ok: {e}"));
}

#[test]
fn a_destination_killed_between_rounds_leaves_a_marked_leftover_that_the_next_run_takes() {
    let fl = FsLab::new("rsync-kill-round");
    let w = fl.start();
    let mut opts = fl.options();
    kill_at(&mut opts, "dst:recv:FsRoundStart#2", Side::Dst, fl.lab.path("fault"));
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert!(fl.lab.path("fault").exists(), "the destination never reached its second round:\n{}", run.describe());
    assert_still_on_source(&fl.lab, &w, &run);
    assert_eq!(mark(&fl.tree), None, "A's tree got a mark though the workload never left");
    // SIGKILLed, the destination could not clean up: what it received is marked as a leftover of its run.
    let m = mark(&fl.tree_b).unwrap_or_default();
    assert!(m.starts_with("receiving "), "B's partial tree carries no receiving mark ({m:?})");

    // The next migration takes the leftover (rsync sends only what differs) and succeeds.
    let mut w = w;
    let done = migrate_and_check(&fl.lab, &mut w, fl.options());
    assert!(done.run.succeeded());
    assert_eq!(mark(&fl.tree_b), None);
}

#[test]
fn a_destination_killed_in_the_frozen_round_leaves_the_workload_running_on_the_source() {
    let fl = FsLab::new("rsync-kill-final");
    let w = fl.start();
    let before = names(&fl.tree.join("data"));
    let mut opts = fl.options();
    kill_at(&mut opts, "dst:step:final-fs-round", Side::Dst, fl.lab.path("fault"));
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert!(fl.lab.path("fault").exists(), "the destination never reached its final round:\n{}", run.describe());
    assert_still_on_source(&fl.lab, &w, &run);
    // Thawed: it goes on changing its tree on A.
    let ops = u64_of(&w.state().expect("state"), "tree_ops");
    w.wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 3))
        .unwrap_or_else(|e| panic!("the workload does not run on A after the roll-back: {e}"));
    assert_ne!(names(&fl.tree.join("data")), before);
    assert!(fl.tree.join("bulk/blob").exists() && fl.tree.join("static/hard2").exists(), "A's tree was damaged");
}

/// A small tmpfs mounted on B's directory for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "phaul-test", &dir.display().to_string()])
            .status()
            .expect("mount");
        assert!(st.success(), "cannot mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_destination_fails_before_the_freeze_and_is_emptied() {
    let fl = FsLab::new("rsync-full");
    let _small = Tmpfs::mount(&fl.tree_b, "2m");
    let w = fl.start();
    let mut opts = fl.options();
    opts.src_args.extend(["--max-frozen".into(), "30".into()]);
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&fl.lab, &w, &run);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(
        all.contains("No space left on device"),
        "the error does not say the destination is full:\n{}",
        run.describe()
    );
    let r = report(&run);
    assert_eq!(
        r["frozen_ms"].as_f64().unwrap_or(0.0),
        0.0,
        "the workload was frozen for a round that could not fit: {r}"
    );
    assert_eq!(names(&fl.tree_b), Vec::<String>::new(), "what was received into the full directory stays there");
    assert_eq!(mark(&fl.tree_b), None);
}

#[test]
fn a_destination_directory_with_someone_elses_files_is_refused_before_the_freeze() {
    let fl = FsLab::new("rsync-foreign");
    std::fs::write(fl.tree_b.join("precious"), b"not phaul's\n").expect("foreign file");
    let w = fl.start();
    let run = fl.lab.migrate(w.pid(), fl.options()).expect("run");
    assert_still_on_source(&fl.lab, &w, &run);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(all.contains("phaul did not make it"), "the refusal does not say why:\n{}", run.describe());
    assert!(
        all.contains(&fl.tree.display().to_string()),
        "the refusal does not name the directory:\n{}",
        run.describe()
    );
    assert_eq!(std::fs::read(fl.tree_b.join("precious")).expect("foreign file"), b"not phaul's\n");
    assert_eq!(names(&fl.tree_b), vec!["precious".to_string()]);
    assert_eq!(mark(&fl.tree_b), None);
    let r = report(&run);
    assert_eq!(r["frozen_ms"].as_f64().unwrap_or(0.0), 0.0, "refused only after freezing: {r}");
}

#[test]
fn the_return_trip_receives_into_the_tree_the_workload_left_and_sends_only_the_differences() {
    let fl = FsLab::new("rsync-return");
    let mut w = fl.start();
    let there = migrate_and_check(&fl.lab, &mut w, fl.options());
    assert_eq!(mark(&fl.tree).as_deref(), Some("migrated-away"));

    // Back: the source (host B) sees B's tree at the tree's path by entering the restored workload's mount
    // namespace; the destination (host A) claims A's old tree by its mark.
    let mut back = fl.options();
    back.reverse = true;
    back.dst_wrapper = None;
    let ns = format!("--mount=/proc/{}/ns/mnt", there.restored);
    back.src_wrapper = Some((PathBuf::from("/usr/bin/nsenter"), vec![ns]));
    let before = probe_ok(&w, there.restored);
    let run = fl.lab.migrate(there.restored, back).expect("run");
    assert!(run.succeeded(), "the migration back failed:\n{}", run.describe());
    let home = run.restored_pid.unwrap_or_else(|| panic!("no restored pid:\n{}", run.describe()));
    w.adopt_pid(home).expect("adopt");
    let a = fl.lab.a().netns_inode().expect("netns of A");
    assert_eq!(phaul_testbed::netns_of_pid(home).expect("netns"), a, "the workload is not back in host A");
    let after = probe_ok(&w, home);
    assert!(u64_of(&after, "tree_ops") >= u64_of(&before, "tree_ops"));
    assert_eq!(mark(&fl.tree), None, "A's tree is the workload's again: its mark must go");
    // The bulk data did not travel back: only what changed in B did.
    let r = report(&run);
    let sent: u64 =
        r["fs_round_list"].as_array().map(|l| l.iter().filter_map(|x| x["bytes"].as_u64()).sum()).unwrap_or(0);
    assert!(sent < 4 << 20, "the return trip sent {sent} bytes: the 8 MiB blob went back whole: {r}");
}

#[test]
fn a_source_killed_between_rounds_leaves_the_workload_running_and_the_destination_cleans_up() {
    let fl = FsLab::new("rsync-kill-src");
    let w = fl.start();
    let mut opts = fl.options();
    kill_at(&mut opts, "src:send:FsRoundStart#2", Side::Src, fl.lab.path("fault"));
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert!(fl.lab.path("fault").exists(), "the source never reached its second round:\n{}", run.describe());
    assert_still_on_source(&fl.lab, &w, &run);
    assert_eq!(mark(&fl.tree), None, "A's tree got a mark though the workload never left");
    // The destination saw its peer go and removed what it had received (the directory was empty before).
    assert!(
        wait_until(Duration::from_secs(20), || names(&fl.tree_b).is_empty() && mark(&fl.tree_b).is_none()),
        "B's directory keeps what a dead source sent: {:?} (mark {:?})\n{}",
        names(&fl.tree_b),
        mark(&fl.tree_b),
        run.describe()
    );
}

#[test]
fn a_missing_rsync_on_either_host_is_named_before_the_freeze() {
    let fl = FsLab::new("rsync-missing");
    let w = fl.start();
    for (side, flag, value) in
        [("source", "src", "rsync=/nonexistent/rsync"), ("destination", "dst", "rsync:rsync=/nonexistent/rsync")]
    {
        let mut opts = fl.options();
        let args = if flag == "src" { &mut opts.src_args } else { &mut opts.dst_args };
        args.extend(["--fs-opt".into(), value.into()]);
        let run = fl.lab.migrate(w.pid(), opts).expect("run");
        assert_still_on_source(&fl.lab, &w, &run);
        let all = format!("{}{}", run.src_stderr, run.dst_stderr);
        assert!(
            all.contains("/nonexistent/rsync"),
            "the {side}'s error does not name the missing rsync:\n{}",
            run.describe()
        );
        let r = report(&run);
        assert_eq!(r["frozen_ms"].as_f64().unwrap_or(0.0), 0.0, "frozen before finding out: {r}");
        assert!(
            names(&fl.tree_b).is_empty() && mark(&fl.tree_b).is_none(),
            "B keeps something after the {side}'s refusal"
        );
    }
}

#[test]
fn a_source_killed_in_the_frozen_round_leaves_the_workload_running_on_the_source() {
    let fl = FsLab::new("rsync-kill-src-final");
    let w = fl.start();
    let mut opts = fl.options();
    kill_at(&mut opts, "src:step:final-fs-round", Side::Src, fl.lab.path("fault"));
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert!(fl.lab.path("fault").exists(), "the source never reached its final round:\n{}", run.describe());
    assert_still_on_source(&fl.lab, &w, &run);
    let ops = u64_of(&w.state().expect("state"), "tree_ops");
    w.wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 3))
        .unwrap_or_else(|e| panic!("the workload stays frozen on A after its phaul died: {e}"));
    assert!(
        wait_until(Duration::from_secs(20), || names(&fl.tree_b).is_empty() && mark(&fl.tree_b).is_none()),
        "B's directory keeps what a dead source sent: {:?}\n{}",
        names(&fl.tree_b),
        run.describe()
    );
}

#[test]
fn a_link_cut_during_a_round_leaves_the_workload_on_the_source_and_b_cleaned() {
    let fl = FsLab::new("rsync-cut");
    let w = fl.start();
    let mut opts = fl.options();
    for (args, prefix) in [(&mut opts.src_args, ""), (&mut opts.dst_args, "rsync:")] {
        args.extend(["--fs-opt".into(), format!("{prefix}io-timeout=8"), "--link-timeout".into(), "5".into()]);
        args.extend(["--timeout".into(), "20".into()]);
    }
    opts.dst_args.extend(["--reconnect-window".into(), "5".into()]);
    let cut = cut_link_at(&mut opts, &fl.lab, "dst:recv:FsRoundStart#2");
    let run = fl.lab.migrate(w.pid(), opts).expect("run");
    assert_cut_done(&cut, &run);
    assert_still_on_source(&fl.lab, &w, &run);
    assert_eq!(mark(&fl.tree), None);
    assert!(
        wait_until(Duration::from_secs(20), || names(&fl.tree_b).is_empty() && mark(&fl.tree_b).is_none()),
        "B's directory keeps what was received before the cut: {:?}\n{}",
        names(&fl.tree_b),
        run.describe()
    );
}

#[test]
fn restart_mode_with_rsync_moves_the_files_and_starts_the_workload_on_them_in_b() {
    // The `cmd` fixture host type (a shell counter stopped and started by signals and `sh -c`, standing in for a
    // container manager) with its state directory as the filesystem root.
    let lab = lab("rsync-restart");
    let plugins = lab.path("plugins-cmd-rsync.toml");
    write_plugins_toml(&plugins, &["cmd", "rsync"]).expect("plugins.toml");
    let mut w = CmdWorkload::start(&lab, "counter");
    let dir_b = lab.path("counter-b");
    std::fs::create_dir_all(&dir_b).expect("B's directory");
    let old = w.pids[0];
    let fl = FsLab { lab, plugins: plugins.clone(), tree: w.dir.clone(), tree_b: dir_b.clone() };
    let mut opts = fl.options();
    opts.target = Some(("cmd".into(), "counter".into()));
    opts.src_args =
        vec!["--mode".into(), "restart".into(), "--htype-opt".into(), w.opt(), "--fs".into(), "rsync".into()];
    let run = fl.lab.migrate(old, opts).expect("run");
    assert!(run.succeeded(), "restart mode with rsync failed:\n{}", run.describe());
    let before = w.count();
    // On B the counter runs in the destination's mount namespace, on B's copy: its pid and count are there.
    let mut on_b = CmdWorkload { dir: dir_b.clone(), pids: Vec::new() };
    let new =
        on_b.wait_new_pid(old, Duration::from_secs(10)).unwrap_or_else(|| panic!("no new pid:\n{}", run.describe()));
    w.pids.push(new);
    on_b.assert_counts_in(new, fl.lab.b().netns_inode().expect("netns of B"), before, "in host B on B's files");
    assert!(!pid_alive(old), "the workload still runs on A");
    assert_eq!(w.count(), before, "A's files changed after the stop");
    assert_eq!(mark(&dir_b), None);
    assert_eq!(mark(&w.dir).as_deref(), Some("migrated-away"));
    let r = report(&run);
    assert_eq!(r["mode"], "restart", "{r}");
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(rounds.last().map(|x| x["frozen"].clone()), Some(Value::Bool(true)), "{r}");
    on_b.pids.clear(); // killed through `w`
}
