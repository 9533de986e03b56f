//! `--fs rsync|btrfs|zfs`: what a filesystem driver's frozen round costs, side by side with copying the tree while
//! frozen by the same tool (described below for rsync; btrfs and zfs compare with a full and an incremental
//! `btrfs send`/`zfs send` of a snapshot, between two loop-device btrfs filesystems or two zfs-fuse hosts).
//!
//! The tree: FILES files of equal size, TOTAL MiB together, plus what the `tree-writer` workload keeps changing.
//! Three methods, in one run, rotated per repetition:
//!
//! - **phaul-rsync**: `phaul migrate pid PID --fs rsync` of the `tree-writer` workload whose directory holds the
//!   tree, between the testbed's two hosts (the destination in its own mount namespace with B's directory at the
//!   tree's path, as in the tests). Measured: the frozen filesystem round (the report's last `fs_round_list`
//!   entry), the whole frozen time and the total.
//! - **rsync-full**: one `rsync -aHAXS --numeric-ids` of the whole tree into an empty directory through a remote
//!   shell that runs the receiving rsync in host B: what a driver that copies the tree only once the workload is
//!   frozen adds to the downtime.
//! - **rsync-delta**: after that copy, 1 % of the files rewritten (same size, new content), then the same rsync
//!   again: the floor for an incremental frozen round (no exact pass, no phaul).
//!
//! The bare rsyncs run over a pipe, phaul's over its TCP filesystem channel across the veth: the comparison
//! favours the bare methods.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use phaul_testbed::storage::{LoopBtrfs, ZfsHost};
use phaul_testbed::{pid_alive, reap_pid, write_plugins_toml, Lab, MigrateOptions};
use serde_json::{json, Value};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// `rsync`, `btrfs` or `zfs`.
    pub driver: String,
    pub files: usize,
    pub total_mib: u64,
    pub reps: u32,
    pub out: PathBuf,
}

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn fill(x: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *b = *x as u8;
    }
}

/// FILES files of TOTAL/FILES bytes each, in 100 directories.
fn make_tree(root: &Path, cfg: &FsConfig, seed: u64) -> Result<Vec<PathBuf>, String> {
    let size = ((cfg.total_mib << 20) / cfg.files.max(1) as u64).max(1) as usize;
    let mut x = seed | 1;
    let mut buf = vec![0u8; size];
    let mut all = Vec::with_capacity(cfg.files);
    for i in 0..cfg.files {
        let dir = root.join(format!("bulk/d{:02}", i % 100));
        std::fs::create_dir_all(&dir).map_err(err("creating the tree"))?;
        fill(&mut x, &mut buf);
        let p = dir.join(format!("f{i}"));
        std::fs::write(&p, &buf).map_err(err("writing the tree"))?;
        all.push(p);
    }
    Ok(all)
}

/// Rewrites every hundredth file in place with new content of the same size.
fn rewrite_one_percent(files: &[PathBuf], seed: u64) -> Result<usize, String> {
    let mut x = seed | 1;
    let mut n = 0;
    for p in files.iter().step_by(100) {
        let len = std::fs::metadata(p).map_err(err("reading the tree"))?.len() as usize;
        let mut buf = vec![0u8; len];
        fill(&mut x, &mut buf);
        std::fs::write(p, &buf).map_err(err("rewriting the tree"))?;
        n += 1;
    }
    Ok(n)
}

/// `rsync -aHAXS --numeric-ids --delete SRC/ B:DST/`, the receiving rsync in host B; its wall time in ms.
fn bare_rsync(lab: &Lab, src: &Path, dst: &Path) -> Result<f64, String> {
    let rsh = lab.path("rsh-b");
    let ns = lab.b().netns_path().display().to_string();
    std::fs::write(&rsh, format!("#!/bin/sh\nshift\nexec nsenter --net={ns} \"$@\"\n")).map_err(err("rsh"))?;
    std::fs::set_permissions(&rsh, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(err("rsh"))?;
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-aHAXS", "--numeric-ids", "--delete", "-e"])
        .arg(&rsh)
        .arg(format!("{}/", src.display()))
        .arg(format!("b:{}/", dst.display()))
        .output()
        .map_err(err("running rsync"))?;
    if !out.status.success() {
        return Err(format!("rsync failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// One phaul migration of a tree-writer over the tree with the rsync driver; (frozen fs round ms, its bytes,
/// frozen ms, total ms, live rounds).
fn phaul_run(cfg: &FsConfig, seed: u64) -> Result<Value, String> {
    if cfg.driver == "zfs" {
        return phaul_run_zfs(cfg, seed);
    }
    let lab = Lab::new(&format!("bench-{}", cfg.driver)).map_err(|e| e.to_string())?;
    let plugins = lab.path("plugins-fs.toml");
    write_plugins_toml(&plugins, &["pid", cfg.driver.as_str()]).map_err(|e| e.to_string())?;
    // rsync: two directories; btrfs: two filesystems, the workload's subvolume on A's. Either way B's is bound
    // over A's in the destination's mount namespace.
    let mut filesystems = Vec::new();
    let (tree, bind_from, bind_over) = if cfg.driver == "btrfs" {
        let a = LoopBtrfs::new(&lab.path("a.img"), &lab.path("btrfs-a"), btrfs_mib(cfg)).map_err(|e| e.to_string())?;
        let b = LoopBtrfs::new(&lab.path("b.img"), &lab.path("btrfs-b"), btrfs_mib(cfg)).map_err(|e| e.to_string())?;
        let ct = a.create_subvolume("ct").map_err(|e| e.to_string())?;
        let r = (ct, b.dir.clone(), a.dir.clone());
        filesystems.push(a);
        filesystems.push(b);
        r
    } else {
        let tree = lab.path("tree");
        let tree_b = lab.path("tree-b");
        std::fs::create_dir_all(&tree_b).map_err(err("tree-b"))?;
        (tree.clone(), tree_b, tree)
    };
    make_tree(&tree, cfg, seed)?;
    let _ = Command::new("sync").status();
    // A container's tree is older than its migration: let the tree age past the driver's 2 s slack, so that
    // the exact pass compares only what the workload changed during the migration (as it would in use).
    std::thread::sleep(Duration::from_secs(3));
    let dir = tree.display().to_string();
    let w = lab.start_workload("tree-writer", &["--dir", &dir]).map_err(|e| e.to_string())?;
    let script =
        format!("mount --bind '{}' '{}' || exit 97; shift; exec \"$@\"", bind_from.display(), bind_over.display());
    let wrapper = ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script, "sh"];
    let opts = MigrateOptions {
        src_args: vec!["--fs".into(), cfg.driver.clone(), "--htype-opt".into(), format!("root={dir}")],
        dst_args: vec!["--fs-opt".into(), format!("{}:allow={}", cfg.driver, lab.scratch.path().display())],
        src_plugins: Some(plugins.clone()),
        dst_plugins: Some(plugins),
        dst_wrapper: Some((PathBuf::from("/usr/bin/unshare"), wrapper.iter().map(|s| s.to_string()).collect())),
        timeout: Some(Duration::from_secs(900)),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).map_err(|e| e.to_string())?;
    finish_run(run, w, filesystems)
}

/// Ends what a phaul run left (its restored workload, the source's, then the filesystems) and reads its
/// report.
fn finish_run<F>(
    run: phaul_testbed::MigrationRun,
    w: phaul_testbed::Workload,
    filesystems: F,
) -> Result<Value, String> {
    if let Some(p) = run.restored_pid {
        if pid_alive(p) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            let _ = reap_pid(p, Duration::from_secs(2));
        }
    }
    drop(w);
    drop(filesystems);
    if !run.succeeded() {
        return Err(format!("the migration failed:\n{}", run.describe()));
    }
    let r = run.report.ok_or("no report")?;
    let rounds = r["fs_round_list"].as_array().cloned().unwrap_or_default();
    let last = rounds.last().cloned().unwrap_or(Value::Null);
    Ok(json!({
        "final_round_ms": last["duration_ms"],
        "final_round_bytes": last["bytes"],
        "frozen_ms": r["frozen_ms"],
        "total_ms": r["total_ms"],
        "live_rounds": rounds.len().saturating_sub(1),
        "first_round_ms": rounds.first().map(|x| x["duration_ms"].clone()),
    }))
}

/// Two ZFS hosts (zfs-fuse daemons in their own mount namespaces, pools `tank` at the same path) with the
/// workload's dataset `tank/ct` on A's and the tree in it.
fn zfs_hosts(lab: &Lab, cfg: &FsConfig, seed: u64) -> Result<(ZfsHost, ZfsHost, PathBuf, Vec<PathBuf>), String> {
    let mnt = lab.path("tank");
    let size = btrfs_mib(cfg);
    let a = ZfsHost::new(&lab.path("a.img"), "tank", &mnt, size).map_err(|e| e.to_string())?;
    let b = ZfsHost::new(&lab.path("b.img"), "tank", &mnt, size).map_err(|e| e.to_string())?;
    a.zfs(&["create", "tank/ct"]).map_err(|e| e.to_string())?;
    let ct = mnt.join("ct");
    let files = make_tree(&a.view(&ct), cfg, seed)?;
    Ok((a, b, ct, files))
}

/// One phaul migration of a tree-writer over the tree in a ZFS dataset with the zfs driver.
fn phaul_run_zfs(cfg: &FsConfig, seed: u64) -> Result<Value, String> {
    let lab = Lab::new("bench-zfs").map_err(|e| e.to_string())?;
    let plugins = lab.path("plugins-fs.toml");
    write_plugins_toml(&plugins, &["pid", "zfs"]).map_err(|e| e.to_string())?;
    let (a, b, ct, _) = zfs_hosts(&lab, cfg, seed)?;
    let dir = ct.display().to_string();
    let (p, mut prefix) = a.wrapper();
    prefix.insert(0, p.display().to_string());
    prefix.push("--".into());
    let w = lab
        .start_workload_prefixed(&prefix, "tree-writer", &["--dir", &dir, "--no-xattrs"])
        .map_err(|e| e.to_string())?;
    let mnt = ct.parent().unwrap_or(Path::new("/")).display().to_string();
    let opts = MigrateOptions {
        src_args: vec!["--fs".into(), "zfs".into(), "--htype-opt".into(), format!("root={dir}")],
        dst_args: vec!["--fs-opt".into(), format!("zfs:allow={mnt}")],
        src_plugins: Some(plugins.clone()),
        dst_plugins: Some(plugins),
        src_wrapper: Some(a.wrapper()),
        dst_wrapper: Some(b.wrapper()),
        timeout: Some(Duration::from_secs(900)),
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts).map_err(|e| e.to_string())?;
    finish_run(run, w, (a, b))
}

/// `zfs send [-i BASE] SNAP` in host A into `zfs recv -u tank/ct` in host B; its wall time in ms.
fn bare_zfs_send(a: &ZfsHost, b: &ZfsHost, base: Option<&str>, snap: &str) -> Result<f64, String> {
    let i = base.map(|b| format!("-i {b}")).unwrap_or_default();
    let script = format!(
        "nsenter --mount --target {} zfs send {i} {snap} | nsenter --mount --target {} zfs recv -u -F tank/ct",
        a.pid(),
        b.pid()
    );
    let t = Instant::now();
    let out = Command::new("/bin/bash").args(["-o", "pipefail", "-c", &script]).output().map_err(err("zfs send"))?;
    if !out.status.success() {
        return Err(format!("{script}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// The bare zfs methods: a full send of a snapshot, then 1 % rewritten and an incremental send.
fn bare_zfs(cfg: &FsConfig, seed: u64) -> Result<Value, String> {
    let lab = Lab::new("bench-zfs-bare").map_err(|e| e.to_string())?;
    let (a, b, _, files) = zfs_hosts(&lab, cfg, seed)?;
    let views: Vec<PathBuf> = files;
    a.zfs(&["snapshot", "tank/ct@s1"]).map_err(|e| e.to_string())?;
    let full = bare_zfs_send(&a, &b, None, "tank/ct@s1")?;
    let n = rewrite_one_percent(&views, seed ^ 0xabcd)?;
    a.zfs(&["snapshot", "tank/ct@s2"]).map_err(|e| e.to_string())?;
    let delta = bare_zfs_send(&a, &b, Some("tank/ct@s1"), "tank/ct@s2")?;
    Ok(json!({ "full_ms": full, "delta_ms": delta, "rewritten": n }))
}

/// `btrfs send [-p PARENT] SNAP | btrfs receive DIR`; its wall time in ms.
fn bare_btrfs_send(parent: Option<&Path>, snap: &Path, dir: &Path) -> Result<f64, String> {
    let p = parent.map(|p| format!("-p '{}'", p.display())).unwrap_or_default();
    let script = format!("btrfs send -q {p} '{}' | btrfs receive '{}'", snap.display(), dir.display());
    let t = Instant::now();
    let out = Command::new("/bin/bash").args(["-o", "pipefail", "-c", &script]).output().map_err(err("btrfs send"))?;
    if !out.status.success() {
        return Err(format!("{script}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn snapshot(src: &Path, snap: &Path) -> Result<(), String> {
    let out = Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(src)
        .arg(snap)
        .output()
        .map_err(err("btrfs snapshot"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("btrfs subvolume snapshot: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The size of each loop-device btrfs for a tree of `cfg.total_mib` (sparse files: only what is written counts).
fn btrfs_mib(cfg: &FsConfig) -> u64 {
    cfg.total_mib * 3 + 512
}

/// The bare btrfs methods: a full send of a snapshot, then 1 % rewritten and an incremental send.
fn bare_btrfs(cfg: &FsConfig, seed: u64) -> Result<Value, String> {
    let lab = Lab::new("bench-btrfs-bare").map_err(|e| e.to_string())?;
    let a = LoopBtrfs::new(&lab.path("a.img"), &lab.path("btrfs-a"), btrfs_mib(cfg)).map_err(|e| e.to_string())?;
    let b = LoopBtrfs::new(&lab.path("b.img"), &lab.path("btrfs-b"), btrfs_mib(cfg)).map_err(|e| e.to_string())?;
    let ct = a.create_subvolume("ct").map_err(|e| e.to_string())?;
    let files = make_tree(&ct, cfg, seed)?;
    let _ = Command::new("sync").status();
    let (s1, s2) = (a.dir.join("s1"), a.dir.join("s2"));
    snapshot(&ct, &s1)?;
    let full = bare_btrfs_send(None, &s1, &b.dir)?;
    let n = rewrite_one_percent(&files, seed ^ 0xabcd)?;
    snapshot(&ct, &s2)?;
    let delta = bare_btrfs_send(Some(&s1), &s2, &b.dir)?;
    Ok(json!({ "full_ms": full, "delta_ms": delta, "rewritten": n }))
}

/// The bare methods: a full copy, then 1 % rewritten and copied again.
fn bare(cfg: &FsConfig, seed: u64) -> Result<Value, String> {
    if cfg.driver == "btrfs" {
        return bare_btrfs(cfg, seed);
    }
    if cfg.driver == "zfs" {
        return bare_zfs(cfg, seed);
    }
    let lab = Lab::new("bench-rsync-bare").map_err(|e| e.to_string())?;
    let tree = lab.path("tree");
    let tree_b = lab.path("tree-b");
    std::fs::create_dir_all(&tree_b).map_err(err("tree-b"))?;
    let files = make_tree(&tree, cfg, seed)?;
    let _ = Command::new("sync").status();
    let full = bare_rsync(&lab, &tree, &tree_b)?;
    // A second tick later, so that size and time both tell rsync what changed.
    std::thread::sleep(Duration::from_millis(1100));
    let n = rewrite_one_percent(&files, seed ^ 0xabcd)?;
    let delta = bare_rsync(&lab, &tree, &tree_b)?;
    Ok(json!({ "full_ms": full, "delta_ms": delta, "rewritten": n }))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[v.len() / 2])
}

fn col(samples: &[Value], key: &str) -> Vec<f64> {
    samples.iter().filter_map(|s| s[key].as_f64()).collect()
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

/// Runs the comparison and writes `results.md` and `results.json` under `cfg.out`; the markdown.
pub fn run(cfg: &FsConfig) -> Result<String, String> {
    std::fs::create_dir_all(&cfg.out).map_err(err("creating the results directory"))?;
    let mut phaul = Vec::new();
    let mut bares = Vec::new();
    let mut failures = Vec::new();
    for rep in 0..cfg.reps {
        let seed = 0x9e37_79b9 + u64::from(rep);
        let order: [bool; 2] = if rep % 2 == 0 { [true, false] } else { [false, true] };
        for is_phaul in order {
            let _ = Command::new("sync").status();
            std::thread::sleep(Duration::from_millis(500));
            let r = if is_phaul { phaul_run(cfg, seed) } else { bare(cfg, seed) };
            eprintln!(
                "[bench] rep {} {} {}: {}",
                rep + 1,
                if is_phaul { "phaul" } else { "bare" },
                cfg.driver,
                match &r {
                    Ok(v) => v.to_string(),
                    Err(e) => format!("FAILED: {e}"),
                }
            );
            match r {
                Ok(v) if is_phaul => phaul.push(v),
                Ok(v) => bares.push(v),
                Err(e) => failures.push(e),
            }
        }
    }
    let final_ms = median(col(&phaul, "final_round_ms"));
    let full_ms = median(col(&bares, "full_ms"));
    let delta_ms = median(col(&bares, "delta_ms"));
    let ratio = match (final_ms, full_ms) {
        (Some(f), Some(c)) if c > 0.0 => Some(f / c),
        _ => None,
    };
    let d = cfg.driver.as_str();
    let (full_what, delta_what) = if d == "btrfs" {
        ("one full `btrfs send` of a snapshot into `btrfs receive`", "a bare `btrfs send -p` after 1 % rewritten")
    } else if d == "zfs" {
        ("one full `zfs send` of a snapshot into `zfs recv` (zfs-fuse)", "a bare `zfs send -i` after 1 % rewritten")
    } else {
        (
            "one full `rsync -aHAXS` copy (what copying only while frozen adds)",
            "a bare incremental rsync after 1 % rewritten",
        )
    };
    let mut md = String::new();
    md.push_str(&format!("# The {d} driver's frozen round against a full copy by the same tool\n\n"));
    md.push_str(&format!(
        "Tree: {} files, {} MiB in all, plus the tree-writer workload's own files; {} repetition(s), medians; load \
         average before the run: {}.\n\n",
        cfg.files,
        cfg.total_mib,
        cfg.reps,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    ));
    md.push_str("| method | what is measured | ms |\n|---|---|---|\n");
    md.push_str(&format!(
        "| phaul-{d} | the frozen filesystem round (after {} live round(s)) | {} |\n",
        median(col(&phaul, "live_rounds")).map(|x| x as u64).unwrap_or(0),
        ms(final_ms)
    ));
    md.push_str(&format!(
        "| phaul-{d} | the whole freeze (CRIU dump, final round, restore, commit) | {} |\n",
        ms(median(col(&phaul, "frozen_ms")))
    ));
    md.push_str(&format!(
        "| phaul-{d} | round 1 (the whole tree, the workload running) | {} |\n",
        ms(median(col(&phaul, "first_round_ms")))
    ));
    md.push_str(&format!("| phaul-{d} | the whole migration | {} |\n", ms(median(col(&phaul, "total_ms")))));
    md.push_str(&format!("| {d}-full | {full_what} | {} |\n", ms(full_ms)));
    md.push_str(&format!("| {d}-delta | {delta_what} | {} |\n", ms(delta_ms)));
    md.push_str(&format!(
        "\n**Target: the frozen round costs at most 5 % of a full copy.** Measured ratio (frozen round ÷ full copy): \
         {} — {}.\n",
        ratio.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into()),
        match ratio {
            Some(r) if r <= 0.05 => "met",
            Some(_) => "NOT met",
            None => "not measured",
        }
    ));
    if !failures.is_empty() {
        md.push_str(&format!("\n{} run(s) failed:\n\n", failures.len()));
        for f in &failures {
            md.push_str(&format!("- {}\n", f.lines().next().unwrap_or("")));
        }
    }
    let j = json!({ "files": cfg.files, "total_mib": cfg.total_mib, "reps": cfg.reps, "driver": cfg.driver, "phaul": phaul,
                    "bare": bares, "failures": failures, "ratio_final_to_full": ratio });
    use crate::plot::{bar_chart, Bar, Style};
    let bars = [
        (format!("phaul-{d}: frozen round"), final_ms, Style::Phaul),
        (format!("phaul-{d}: whole freeze"), median(col(&phaul, "frozen_ms")), Style::Phaul),
        (format!("{d}: bare delta"), delta_ms, Style::Raw),
        (format!("{d}: full copy"), full_ms, Style::Criu),
    ];
    let bars: Vec<Bar> =
        bars.into_iter().filter_map(|(label, v, style)| v.map(|value| Bar { label, value, style })).collect();
    let png = cfg.out.join("frozen-round.png");
    match bar_chart(&png, &format!("{d}: the frozen round against a full copy (ms, log scale)"), "ms", &bars) {
        Ok(()) => md.push_str(
            "
![frozen round vs full copy](frozen-round.png)
",
        ),
        Err(e) => md.push_str(&format!(
            "
(no plot: {})\n",
            e.0
        )),
    }
    std::fs::write(cfg.out.join("results.md"), &md).map_err(err("writing results.md"))?;
    std::fs::write(cfg.out.join("results.json"), serde_json::to_string_pretty(&j).unwrap_or_default())
        .map_err(err("writing results.json"))?;
    if failures.is_empty() {
        Ok(md)
    } else {
        Err(format!("{} run(s) failed\n{md}", failures.len()))
    }
}
