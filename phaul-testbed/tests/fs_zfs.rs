//! The `zfs` filesystem driver, end to end, on real ZFS (zfs-fuse: ZFS in user space, pool version 23). Each host
//! has its own zfs-fuse daemon in a mount namespace of its own with its own pool, both called `tank` and mounted
//! at the same path, as on two machines. phaul migrate, the workload and phaul serve run in their host's
//! namespace (the restored workload inherits B's); the test reads both hosts' files through the daemons'
//! `/proc/PID/root`.
//!
//! zfs-fuse has no extended attributes or ACLs (FUSE answers EOPNOTSUPP; kernel ZFS has both), so the tree-writer
//! workload lays out none here.
//!
//! CRIU and FUSE: CRIU 4.2 dumps and restores a process whose open files and working directory are on a FUSE
//! mount (the zfs-fuse dataset) as long as the process shares its mount namespace with CRIU, as here; these tests
//! are that finding, checked on every run.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use phaul_testbed::fault::{kill_at, wait_until, Side};
use phaul_testbed::storage::ZfsHost;
use phaul_testbed::{pid_alive, write_plugins_toml, Lab, MigrateOptions, MigrationRun, Workload};
use serde_json::Value;

struct ZfsLab {
    plugins: PathBuf,
    /// Where both pools are mounted, each in its own host's namespace.
    mnt: PathBuf,
    a: ZfsHost,
    b: ZfsHost,
    // Dropped last: the pools go after the lab's processes.
    lab: Lab,
}

fn blob(len: usize) -> Vec<u8> {
    let mut blob = vec![0u8; len];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for v in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    blob
}

impl ZfsLab {
    /// Host A's pool with the workload's dataset `tank/ct` (and 8 MiB of bulk data), host B's pool.
    fn new(tag: &str, b_mib: u64) -> ZfsLab {
        let lab = lab(tag);
        let plugins = lab.path("plugins-zfs.toml");
        write_plugins_toml(&plugins, &["pid", "zfs"]).expect("plugins.toml");
        let mnt = lab.path("tank");
        let a = ZfsHost::new(&lab.path("a.img"), "tank", &mnt, 512).expect("A's pool");
        let b = ZfsHost::new(&lab.path("b.img"), "tank", &mnt, b_mib).expect("B's pool");
        a.zfs(&["create", "tank/ct"]).expect("A's dataset");
        let bulk = a.view(&mnt.join("ct/bulk"));
        std::fs::create_dir_all(&bulk).expect("bulk");
        std::fs::write(bulk.join("blob"), blob(8 << 20)).expect("bulk data");
        ZfsLab { plugins, mnt, a, b, lab }
    }

    fn ct(&self) -> PathBuf {
        self.mnt.join("ct")
    }

    fn prefix(host: &ZfsHost) -> Vec<String> {
        let (p, mut args) = host.wrapper();
        args.insert(0, p.display().to_string());
        args.push("--".into());
        args
    }

    fn start_in(&self, dir: &Path) -> Workload {
        let d = dir.display().to_string();
        self.lab
            .start_workload_prefixed(&Self::prefix(&self.a), "tree-writer", &["--dir", &d, "--no-xattrs"])
            .expect("tree-writer")
    }

    fn start(&self) -> Workload {
        self.start_in(&self.ct())
    }

    fn options(&self) -> MigrateOptions {
        MigrateOptions {
            src_args: vec!["--fs".into(), "zfs".into(), "--htype-opt".into(), format!("root={}", self.ct().display())],
            dst_args: vec!["--fs-opt".into(), format!("zfs:allow={}", self.mnt.display())],
            src_plugins: Some(self.plugins.clone()),
            dst_plugins: Some(self.plugins.clone()),
            src_wrapper: Some(self.a.wrapper()),
            dst_wrapper: Some(self.b.wrapper()),
            ..Default::default()
        }
    }

    fn owner(host: &ZfsHost, ds: &str) -> String {
        host.zfs(&["get", "-H", "-o", "value", "phaul:owner", ds]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// No snapshot on either host; B holds the workload's dataset or nothing.
    fn assert_clean(&self, run: &MigrationRun, b_has_ct: bool) {
        let all = |h: &ZfsHost| h.all().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all(&self.a), ["tank", "tank/ct"], "snapshots left on A:\n{}", run.describe());
        let want: &[&str] = if b_has_ct { &["tank", "tank/ct"] } else { &["tank"] };
        assert_eq!(all(&self.b), want, "B keeps something:\n{}", run.describe());
    }
}

fn report(run: &MigrationRun) -> Value {
    run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()))
}

#[test]
fn zfs_sends_snapshots_in_rounds_and_b_ends_with_its_dataset_equal_to_a_at_the_freeze() {
    let zl = ZfsLab::new("zfs-ok", 512);
    let mut w = zl.start();
    assert!(wait_until(Duration::from_secs(10), || w.state().is_ok_and(|s| s["tree_ops"].as_u64() > Some(12))));
    let mut opts = zl.options();
    let compared =
        compare_at_restore_reply(&mut opts, zl.lab.path("fault-restored"), zl.a.view(&zl.ct()), zl.b.view(&zl.ct()));
    let m = migrate_and_check(&zl.lab, &mut w, opts);
    assert_trees_equal(&compared, &m.run);
    // The workload writes on in B's dataset; A's stays, marked.
    let ops = u64_of(&m.after, "tree_ops");
    let later = w
        .wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 5))
        .unwrap_or_else(|e| panic!("the workload stopped writing in B: {e}"));
    let newest = format!("n{}", u64_of(&later, "tree_ops") - 1);
    let on = |h: &ZfsHost| h.view(&zl.ct().join("data").join(&newest));
    assert!(wait_until(Duration::from_secs(5), || on(&zl.b).exists()), "B's dataset has no {newest}");
    assert!(!on(&zl.a).exists(), "the restored workload wrote into A's dataset");
    assert_eq!(ZfsLab::owner(&zl.a, "tank/ct"), "migrated-away");
    assert_eq!(ZfsLab::owner(&zl.b, "tank/ct"), "-", "B's dataset still carries phaul's mark");
    assert_eq!(zl.b.zfs(&["get", "-H", "-o", "value", "mounted,canmount", "tank/ct"]).ok().as_deref(), Some("yes\non"));
    zl.assert_clean(&m.run, true);

    let r = report(&m.run);
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("no fs_round_list: {r}"));
    let (last, live) = rounds.split_last().unwrap_or_else(|| panic!("no rounds: {r}"));
    assert_eq!(last["frozen"], true, "{r}");
    assert!(live.len() >= 2, "8 MiB in round 1 calls for a second live round: {r}");
    assert!(live[0]["bytes"].as_u64() >= Some(8 << 20), "round 1 sent the whole dataset: {r}");
    assert!(last["bytes"].as_u64() < Some(1 << 20), "the frozen round sends only the last delta: {r}");
}

#[test]
fn a_destination_killed_in_round_2_leaves_the_workload_on_a_and_its_leftover_is_taken_by_the_next_run() {
    let zl = ZfsLab::new("zfs-kill", 512);
    let w = zl.start();
    let mut opts = zl.options();
    kill_at(&mut opts, "dst:recv:FsRoundStart#2", Side::Dst, zl.lab.path("fault"));
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert!(zl.lab.path("fault").exists(), "the destination never reached round 2:\n{}", run.describe());
    assert_still_on_source(&zl.lab, &w, &run);
    assert_eq!(zl.a.all().expect("A"), ["tank", "tank/ct"], "the source's snapshots stay:\n{}", run.describe());
    assert_eq!(ZfsLab::owner(&zl.a, "tank/ct"), "-");
    // SIGKILLed, the destination could not clean up: what it received carries its receiving mark.
    assert!(ZfsLab::owner(&zl.b, "tank/ct").starts_with("receiving "), "{:?}", zl.b.all());
    let mut w = w;
    let done = migrate_and_check(&zl.lab, &mut w, zl.options());
    assert!(done.run.succeeded());
    assert_eq!(ZfsLab::owner(&zl.b, "tank/ct"), "-");
    zl.assert_clean(&done.run, true);
}

#[test]
fn a_destination_killed_in_the_frozen_round_leaves_the_workload_running_on_a() {
    let zl = ZfsLab::new("zfs-kill-final", 512);
    let w = zl.start();
    let mut opts = zl.options();
    kill_at(&mut opts, "dst:step:final-fs-round", Side::Dst, zl.lab.path("fault"));
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert!(zl.lab.path("fault").exists(), "the destination never reached its final round:\n{}", run.describe());
    assert_still_on_source(&zl.lab, &w, &run);
    let ops = u64_of(&w.state().expect("state"), "tree_ops");
    w.wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 3))
        .unwrap_or_else(|e| panic!("the workload does not run on A after the roll-back: {e}"));
    assert_eq!(zl.a.all().expect("A"), ["tank", "tank/ct"], "the source's snapshots stay:\n{}", run.describe());
    assert!(zl.a.view(&zl.ct().join("bulk/blob")).exists(), "A's dataset was damaged");
}

#[test]
fn a_full_destination_fails_before_the_freeze_and_b_is_cleaned() {
    // B's pool is too small for round 1 (8 MiB of bulk data and more): a dataset that is not phaul's fills it.
    let zl = ZfsLab::new("zfs-full", 128);
    zl.b.zfs(&["create", "tank/filler"]).expect("filler");
    let filler = zl.b.view(&zl.mnt.join("filler/f"));
    let _ = std::fs::write(&filler, blob(80 << 20));
    let w = zl.start();
    let run = zl.lab.migrate(w.pid(), zl.options()).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(
        all.contains("out of space") || all.contains("No space left"),
        "the error does not say B is full:\n{}",
        run.describe()
    );
    assert_eq!(report(&run)["frozen_ms"].as_f64().unwrap_or(0.0), 0.0, "frozen for a round that could not fit");
    assert_eq!(zl.a.all().expect("A"), ["tank", "tank/ct"]);
    assert_eq!(zl.b.all().expect("B"), ["tank", "tank/filler"], "B keeps what it received:\n{}", run.describe());
}

#[test]
fn a_plain_directory_a_foreign_dataset_a_missing_zfs_and_a_return_trip_are_refused_with_what_to_do() {
    let zl = ZfsLab::new("zfs-refused", 512);
    // A plain directory inside A's pool.
    let plain = zl.mnt.join("plain");
    std::fs::create_dir_all(zl.a.view(&plain)).expect("plain dir");
    let w = zl.start_in(&plain);
    let mut opts = zl.options();
    opts.src_args = vec!["--fs".into(), "zfs".into(), "--htype-opt".into(), format!("root={}", plain.display())];
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(run.src_stderr.contains("is not the mount point of a mounted ZFS filesystem"), "{}", run.describe());
    assert!(run.src_stderr.contains("--fs rsync"), "the refusal does not say what to do:\n{}", run.describe());
    // A dataset with a dataset below it: zfs send would leave the child's files behind, so it is refused.
    zl.a.zfs(&["create", "tank/outer"]).expect("outer");
    zl.a.zfs(&["create", "tank/outer/inner"]).expect("inner");
    let mut opts = zl.options();
    let outer = zl.mnt.join("outer").display().to_string();
    opts.src_args = vec!["--fs".into(), "zfs".into(), "--htype-opt".into(), format!("root={outer}")];
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(run.src_stderr.contains("has datasets below it (tank/outer/inner)"), "{}", run.describe());
    zl.a.destroy("tank/outer").expect("removing tank/outer");
    drop(w);

    // B has a dataset of that name that phaul did not make: refused, and left alone.
    let mut w = zl.start();
    zl.b.zfs(&["create", "tank/ct"]).expect("B's own dataset");
    std::fs::write(zl.b.view(&zl.ct().join("keep")), b"B's own").expect("B's file");
    let run = zl.lab.migrate(w.pid(), zl.options()).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(run.dst_stderr.contains("phaul did not make it"), "{}", run.describe());
    assert_eq!(std::fs::read(zl.b.view(&zl.ct().join("keep"))).ok().as_deref(), Some(&b"B's own"[..]));
    zl.b.destroy("tank/ct").expect("removing B's own dataset");

    // No zfs program on the source (an operator's wrong path): refused before anything is taken.
    let mut opts = zl.options();
    opts.src_args.extend(["--fs-opt".into(), "zfs=/nonexistent/zfs".into()]);
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(run.src_stderr.contains("/nonexistent/zfs"), "{}", run.describe());
    zl.assert_clean(&run, false);
    // The same on the destination.
    let mut opts = zl.options();
    opts.dst_args.extend(["--fs-opt".into(), "zfs:zfs=/nonexistent/zfs".into()]);
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(format!("{}{}", run.src_stderr, run.dst_stderr).contains("/nonexistent/zfs"), "{}", run.describe());
    zl.assert_clean(&run, false);

    // There and back: the way back finds the dataset the workload left, and says how to proceed.
    let there = migrate_and_check(&zl.lab, &mut w, zl.options());
    let mut back = zl.options();
    back.reverse = true;
    back.src_wrapper = Some(zl.b.wrapper());
    back.dst_wrapper = Some(zl.a.wrapper());
    let run = zl.lab.migrate(there.restored, back).expect("run");
    assert!(!run.src_status.success(), "the return trip claims success:\n{}", run.describe());
    assert!(pid_alive(there.restored), "the workload died on B:\n{}", run.describe());
    probe_ok(&w, there.restored);
    let all = format!("{}{}", run.src_stderr, run.dst_stderr);
    assert!(all.contains("migrated away") && all.contains("zfs destroy -r"), "{}", run.describe());
    assert_eq!(ZfsLab::owner(&zl.a, "tank/ct"), "migrated-away", "A's old dataset lost its mark");
    assert!(zl.a.view(&zl.ct().join("bulk/blob")).exists(), "A's old dataset was touched");
    zl.assert_clean(&run, true);
}

#[test]
fn a_source_killed_after_b_restored_leaves_the_workload_on_a_and_b_destroys_its_mounted_dataset() {
    let zl = ZfsLab::new("zfs-kill-src", 512);
    let w = zl.start();
    let mut opts = zl.options();
    // B has received the frozen round, mounted its dataset and restored the workload into it; no commit yet.
    kill_at(&mut opts, "src:recv:RestoreReply", Side::Src, zl.lab.path("fault"));
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert!(zl.lab.path("fault").exists(), "the source never heard of the restore:\n{}", run.describe());
    assert_still_on_source(&zl.lab, &w, &run);
    let ops = u64_of(&w.state().expect("state"), "tree_ops");
    w.wait_state("more tree ops", Duration::from_secs(10), |s| s["tree_ops"].as_u64() > Some(ops + 3))
        .unwrap_or_else(|e| panic!("the workload stays frozen on A after its phaul died: {e}"));
    assert!(
        wait_until(Duration::from_secs(30), || zl.b.all().is_ok_and(|l| l == ["tank"])),
        "B keeps what a dead source sent: {:?}\n{}",
        zl.b.all(),
        run.describe()
    );
    assert_eq!(ZfsLab::owner(&zl.a, "tank/ct"), "-");
    // SIGKILLed, the source could not destroy its snapshot; the next run from A sweeps it (its phaul is gone)
    // and succeeds.
    let left = zl.a.all().expect("A");
    assert!(
        left.len() > 2 && left[2..].iter().all(|s| s.starts_with("tank/ct@phaul-")),
        "A should hold the dead run's snapshots and nothing else: {left:?}"
    );
    let mut w = w;
    let done = migrate_and_check(&zl.lab, &mut w, zl.options());
    zl.assert_clean(&done.run, true);
}

#[test]
fn a_link_cut_during_round_2_leaves_the_workload_on_a_and_b_cleaned() {
    let zl = ZfsLab::new("zfs-cut", 512);
    let w = zl.start();
    let mut opts = zl.options();
    for (args, prefix) in [(&mut opts.src_args, ""), (&mut opts.dst_args, "zfs:")] {
        args.extend(["--fs-opt".into(), format!("{prefix}io-timeout=8"), "--link-timeout".into(), "5".into()]);
        args.extend(["--timeout".into(), "20".into()]);
    }
    opts.dst_args.extend(["--reconnect-window".into(), "5".into()]);
    let cut = cut_link_at(&mut opts, &zl.lab, "dst:recv:FsRoundStart#2");
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert_cut_done(&cut, &run);
    assert_still_on_source(&zl.lab, &w, &run);
    assert_eq!(zl.a.all().expect("A"), ["tank", "tank/ct"], "the source's snapshots stay:\n{}", run.describe());
    assert!(
        wait_until(Duration::from_secs(20), || zl.b.all().is_ok_and(|l| l == ["tank"])),
        "B keeps what was received before the cut: {:?}\n{}",
        zl.b.all(),
        run.describe()
    );
}

#[test]
fn restart_mode_with_zfs_moves_the_dataset_and_starts_the_workload_on_it_in_b() {
    // The `cmd` fixture host type (a shell counter stopped and started by signals and `sh -c`, standing in for a
    // container manager) with its state directory, the dataset tank/ct, as the filesystem root.
    let zl = ZfsLab::new("zfs-restart", 512);
    let plugins = zl.lab.path("plugins-cmd-zfs.toml");
    write_plugins_toml(&plugins, &["cmd", "zfs"]).expect("plugins.toml");
    let ct = zl.ct();
    let mut w = CmdWorkload::start_in(&zl.lab, &ct, &zl.a.view(&ct), &ZfsLab::prefix(&zl.a));
    let old = w.pids[0];
    let mut opts = zl.options();
    opts.src_plugins = Some(plugins.clone());
    opts.dst_plugins = Some(plugins);
    opts.target = Some(("cmd".into(), "counter".into()));
    opts.src_args = vec![
        "--mode".into(),
        "restart".into(),
        "--htype-opt".into(),
        format!("dir={}", ct.display()),
        "--fs".into(),
        "zfs".into(),
    ];
    let run = zl.lab.migrate(old, opts).expect("run");
    assert!(run.succeeded(), "restart mode with zfs failed:\n{}", run.describe());
    let before = w.count();
    // On B the counter runs in B's namespace, on B's dataset.
    let mut on_b = CmdWorkload { dir: zl.b.view(&ct), pids: Vec::new() };
    let new =
        on_b.wait_new_pid(old, Duration::from_secs(10)).unwrap_or_else(|| panic!("no new pid:\n{}", run.describe()));
    w.pids.push(new);
    on_b.assert_counts_in(new, zl.lab.b().netns_inode().expect("netns of B"), before, "in host B on B's dataset");
    assert!(!pid_alive(old), "the workload still runs on A");
    assert_eq!(w.count(), before, "A's files changed after the stop");
    assert_eq!(ZfsLab::owner(&zl.a, "tank/ct"), "migrated-away");
    assert_eq!(ZfsLab::owner(&zl.b, "tank/ct"), "-");
    let r = report(&run);
    assert_eq!(r["mode"], "restart", "{r}");
    let rounds = r["fs_round_list"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(rounds.last().map(|x| x["frozen"].clone()), Some(Value::Bool(true)), "{r}");
    on_b.pids.clear(); // killed through `w`
    drop(w);
    zl.assert_clean(&run, true);
}

#[test]
fn a_destination_killed_after_it_mounted_leaves_a_dataset_no_later_run_removes_on_its_own() {
    let zl = ZfsLab::new("zfs-kill-mounted", 512);
    let mut w = zl.start();
    let mut opts = zl.options();
    // B mounted its dataset and restored the workload into it, and dies before its reply.
    kill_at(&mut opts, "dst:send:RestoreReply", Side::Dst, zl.lab.path("fault"));
    let run = zl.lab.migrate(w.pid(), opts).expect("run");
    assert!(zl.lab.path("fault").exists(), "the destination never restored:\n{}", run.describe());
    assert_still_on_source(&zl.lab, &w, &run);
    assert!(ZfsLab::owner(&zl.b, "tank/ct").starts_with("mounted "), "{:?}", zl.b.all());
    // A mounted leftover may hold a restored workload: the next run refuses it and says what to check.
    let again = zl.lab.migrate(w.pid(), zl.options()).expect("run");
    assert_still_on_source(&zl.lab, &w, &again);
    assert!(again.dst_stderr.contains("mounted it and did not finish"), "{}", again.describe());
    assert!(zl.b.all().expect("B").contains(&"tank/ct".to_string()), "the mounted leftover was removed");
    // Once the operator has looked and destroyed it, the migration goes through.
    zl.b.destroy("tank/ct").expect("the operator destroys the leftover");
    let done = migrate_and_check(&zl.lab, &mut w, zl.options());
    zl.assert_clean(&done.run, true);
}
