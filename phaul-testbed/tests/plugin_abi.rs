//! The plugin interface holds across revisions, with real libraries built by cargo:
//!
//! - a plugin built against the frozen copy of the interface at revision 2 (`fixtures/abi-rev2`, phaul-abi 1.0.0,
//!   one method and one CRIU option fewer than today's) is listed with its revision and migrates a real workload,
//!   and its log lines and progress reach both sides' logs under its name;
//! - one library exports a host type and a filesystem driver, and both are used in that migration;
//! - the out-of-tree template (`templates/phaul-plugin`), copied out of the repository and built there against
//!   this checkout's phaul-abi, loads.
//!
//! The fixtures are built offline with the workspace's own Cargo.lock (so with the same abi_stable), into
//! `target/fixtures`, each at most once per test run.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use phaul_core::abi::PHAUL_ABI_VERSION;
use phaul_testbed::{
    collect, netns_of_pid, pid_alive, run_collect, spawn_with_fds, wait_pid_gone, Collected, Lab, PLUGIN_FILES,
};
use serde_json::Value;

/// The longest a fixture build may take (a first build compiles abi_stable and its dependencies: about 40 s here).
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// The crate name of the revision-2 fixture, as its log lines carry it.
const REV2_PLUGIN: &str = "phaul-fixture-abi-rev2";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn fixtures_target() -> PathBuf {
    repo_root().join("target").join("fixtures")
}

fn cargo() -> PathBuf {
    if let Some(c) = std::env::var_os("CARGO") {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cargo/bin/cargo");
    if home.is_file() {
        home
    } else {
        PathBuf::from("cargo")
    }
}

/// Copies the tree `from` into `to`, leaving alone files whose content is already the same (so that cargo's
/// fingerprints, which look at modification times, keep earlier builds), and skipping build products.
fn sync_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display())) {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().expect("file type").is_dir() {
            sync_tree(&src, &dst);
        } else {
            let text = std::fs::read(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
            if std::fs::read(&dst).ok().as_deref() != Some(text.as_slice()) {
                std::fs::write(&dst, &text).unwrap_or_else(|e| panic!("writing {}: {e}", dst.display()));
            }
        }
    }
}

/// `cargo build --offline` of the workspace whose manifest is `manifest` (with the workspace's Cargo.lock copied
/// beside it first), into `target/fixtures`; returns the library `lib` it built.
fn cargo_build(manifest: &Path, lib: &str) -> Result<PathBuf, String> {
    let lock = manifest.with_file_name("Cargo.lock");
    let want = std::fs::read(repo_root().join("Cargo.lock")).map_err(|e| format!("reading Cargo.lock: {e}"))?;
    if std::fs::read(&lock).ok() != Some(want.clone()) {
        std::fs::write(&lock, want).map_err(|e| format!("writing {}: {e}", lock.display()))?;
    }
    let mut cmd = Command::new(cargo());
    cmd.args(["build", "--offline", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(fixtures_target())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    let out = run_collect(cmd, BUILD_TIMEOUT, "cargo build of a fixture plugin").map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("cargo build --manifest-path {} failed:\n{}", manifest.display(), out.stderr));
    }
    let so = fixtures_target().join("debug").join(lib);
    if so.is_file() {
        Ok(so)
    } else {
        Err(format!("cargo built {} but {} is not there", manifest.display(), so.display()))
    }
}

/// The revision-2 fixture, built once per test run from a copy under `target/fixtures/src` (the repository's copy
/// is never written to).
fn rev2_plugin() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let staged = fixtures_target().join("src").join("abi-rev2");
        sync_tree(&repo_root().join("phaul-testbed/fixtures/abi-rev2"), &staged);
        cargo_build(&staged.join("Cargo.toml"), "libphaul_fixture_abi_rev2.so")
    });
    built.clone().unwrap_or_else(|e| panic!("{e}"))
}

fn workspace_plugin(name: &str) -> PathBuf {
    let file = PLUGIN_FILES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).expect("a workspace plugin");
    phaul_testbed::locate_binary("phaul").expect("phaul").with_file_name(file)
}

/// A plugin list of these libraries (in this order), with `rev2pid` using `rev2fs` by default.
fn write_plugin_list(path: &Path, libs: &[PathBuf]) {
    let mut text = String::new();
    for l in libs {
        text.push_str(&format!("[[plugin]]\npath = \"{}\"\n\n", l.display()));
    }
    text.push_str("[host-type.rev2pid]\nfs = \"rev2fs\"\n");
    std::fs::write(path, text).expect("write the plugin list");
}

fn plugins_json(lab: &Lab, list: &Path) -> Vec<Value> {
    let out = lab.phaul(&["--plugins", &list.display().to_string(), "plugins", "--json"], &[]).expect("run phaul");
    assert!(out.status.success(), "phaul plugins --json failed:\n{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout));
    v.as_array().cloned().unwrap_or_else(|| panic!("not a list: {v}"))
}

fn driver<'a>(list: &'a [Value], kind: &str, name: &str) -> &'a Value {
    list.iter()
        .find(|p| p["kind"] == kind && p["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} driver {name} in {list:?}"))
}

/// The old plugin is listed first, so that it is also the first library the host checks: what the host's
/// checks remember of it must not make them refuse the current plugins loaded after it.
#[test]
fn a_revision_2_plugin_is_listed_with_its_revision_beside_current_ones() {
    let lab = lab("abirev2list");
    let rev2 = rev2_plugin();
    let list = lab.path("rev2-list.toml");
    write_plugin_list(&list, &[rev2.clone(), workspace_plugin("pid"), workspace_plugin("shared")]);
    let all = plugins_json(&lab, &list);
    for name in ["rev2pid", "rev2fs"] {
        let kind = if name == "rev2pid" { "htype" } else { "fs" };
        let p = driver(&all, kind, name);
        assert_eq!(p["abi_revision"], 2, "{p}");
        assert_eq!(p["version"], "0.2.0", "{p}");
        assert_eq!(p["file"], rev2.display().to_string(), "{p}");
    }
    assert_eq!(driver(&all, "htype", "rev2pid")["default_fs"], "rev2fs");
    for (kind, name) in [("htype", "pid"), ("fs", "shared")] {
        assert_eq!(driver(&all, kind, name)["abi_revision"], PHAUL_ABI_VERSION, "{name}");
    }
    // The table shows the revision too.
    let out = lab.phaul(&["--plugins", &list.display().to_string(), "plugins"], &[]).expect("run phaul");
    assert!(out.status.success(), "{}", out.stderr);
    let row = out.stdout.lines().find(|l| l.contains("rev2pid")).unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(row.split_whitespace().nth(3) == Some("2"), "no revision 2 in {row:?}:\n{}", out.stdout);
    let header = out.stdout.lines().nth(1).unwrap_or_default();
    assert!(header.contains("ABI"), "{}", out.stdout);
}

/// What the old plugin's host type lacks falls back to the host's defaults: `discard` (revision 3) answers "leave
/// it to phaul", and its CRIU options, read by a host that knows `ghost-limit`, have none.
#[test]
fn what_a_revision_2_host_type_lacks_falls_back_to_the_defaults() {
    use phaul_core::abi::{CriuStage, Mode, Outcome, Role};
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let list = scratch.path().join("rev2.toml");
    write_plugin_list(&list, &[rev2_plugin()]);
    let reg = phaul_core::plugins::Registry::load(&list).unwrap_or_else(|e| panic!("{e}"));
    let me = std::process::id().to_string();
    let mut ht = reg
        .new_host_type("rev2pid", Role::DESTINATION, Mode::LIVE, &me, &[], scratch.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!ht.discard(std::process::id() as i32).into_result().expect("discard"), "no discard of its own");
    let o = phaul_core::plugins::criu_options(&mut ht, CriuStage::RESTORE).into_result().expect("options");
    assert!(o.tcp_established && o.file_locks && o.link_remap, "{o:?}");
    assert_eq!(o.ghost_limit, None);
    ht.finish(Outcome::ROLLED_BACK).into_result().expect("finish");
}

/// A child killed (by its pid) and reaped if the test ends before it was collected.
struct Kid(Option<Child>);

impl Kid {
    fn collect(mut self, timeout: Duration, what: &str) -> Collected {
        let c = self.0.take().expect("not collected yet");
        collect(c, timeout, what).unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real migration from host A to host B (`phaul serve` in B, `phaul migrate HTYPE ID` in A, three TCP
/// connections over the veth handed in as descriptors), both sides logging to files in the scratch directory.
struct Run {
    report: Value,
    restored: i32,
    /// The source tree's root pid.
    source: i32,
    src_log: String,
    dst_log: String,
}

fn migrate(lab: &Lab, list: &Path, htype: &str, w: &mut phaul_testbed::Workload) -> Run {
    let id = w.pid().to_string();
    let id = id.as_str();
    let ch = lab.pair.channel_triple().expect("channels");
    let list = list.display().to_string();
    let p = |name: &str| lab.path(name).display().to_string();
    let (src_log, dst_log) = (lab.path("migrate.log"), lab.path("serve.log"));
    let dst_args = [
        "--plugins",
        &list,
        "--log-file",
        &dst_log.display().to_string(),
        "--state-dir",
        &p("dst-state"),
        "--timeout",
        "60",
        "serve",
        "--fdrpc",
        "3",
        "--fdmem",
        "4",
        "--fdfs",
        "5",
        "--img-path",
        &p("dst-images"),
        "--rpid-dir",
        &lab.scratch.path().display().to_string(),
    ]
    .map(String::from);
    let mut serve = lab.b().command(&lab.phaul, &dst_args);
    serve.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let serve = Kid(Some(
        spawn_with_fds(serve, &[(ch.rpc.1.as_fd(), 3), (ch.mem.1.as_fd(), 4), (ch.fs.1.as_fd(), 5)]).expect("serve"),
    ));
    let src_args = [
        "--plugins",
        &list,
        "--log-file",
        &src_log.display().to_string(),
        "--state-dir",
        &p("src-state"),
        "--timeout",
        "60",
        "migrate",
        htype,
        id,
        "--fdrpc",
        "3",
        "--fdmem",
        "4",
        "--fdfs",
        "5",
        "--img-path",
        &p("src-images"),
        "--dst-rpid",
        "abi.rpid",
        "--json",
    ]
    .map(String::from);
    let mut mig = lab.a().command(&lab.phaul, &src_args);
    mig.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mig = Kid(Some(
        spawn_with_fds(mig, &[(ch.rpc.0.as_fd(), 3), (ch.mem.0.as_fd(), 4), (ch.fs.0.as_fd(), 5)]).expect("migrate"),
    ));
    // Only the two phaul processes may hold the channels.
    drop(ch);
    let src = mig.collect(Duration::from_secs(120), "phaul migrate");
    let dst = serve.collect(Duration::from_secs(60), "phaul serve");
    let (src_log, dst_log) =
        (std::fs::read_to_string(&src_log).unwrap_or_default(), std::fs::read_to_string(&dst_log).unwrap_or_default());
    let restored: Option<i32> = std::fs::read_to_string(lab.path("abi.rpid")).ok().and_then(|s| s.trim().parse().ok());
    let source = w.pid();
    if let Some(pid) = restored {
        // Whatever else goes wrong below, the workload's end kills this copy too.
        let _ = w.adopt_pid(pid);
    }
    let describe = || {
        format!(
            "source exit {:?}:\n{}\n{}\n--- source log:\n{src_log}\n--- destination exit {:?}:\n{}\n--- destination log:\n{dst_log}",
            src.status.code(),
            src.stdout,
            src.stderr,
            dst.status.code(),
            dst.stderr
        )
    };
    assert!(src.status.success() && dst.status.success(), "the migration failed:\n{}", describe());
    let report: Value =
        serde_json::from_str(&src.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}", describe()));
    let restored = restored.unwrap_or_else(|| panic!("no restored pid written:\n{}", describe()));
    Run { report, restored, source, src_log, dst_log }
}

/// The workload moved: gone from A, running in B and passing its self-check, its counter gone on.
fn assert_moved(lab: &Lab, w: &phaul_testbed::Workload, before: &Value, run: &Run) {
    let source = run.source;
    assert!(wait_pid_gone(source, Duration::from_secs(10)), "the source tree {source} is still alive on A");
    assert!(pid_alive(run.restored), "the restored tree {} is not running", run.restored);
    let b = lab.b().netns_inode().expect("netns of B");
    assert_eq!(netns_of_pid(run.restored).expect("netns of the restored tree"), b, "not restored in host B");
    let after = probe_ok(w, run.restored);
    assert!(u64_of(&after, "counter") >= u64_of(before, "counter"), "the counter restarted: {before} then {after}");
    w.wait_counter_above(u64_of(&after, "counter") + 3, Duration::from_secs(10)).expect("it keeps counting on B");
    assert_eq!(run.report["outcome"], "migrated", "{}", run.report);
    assert_eq!(run.report["restored_pid"], run.restored, "{}", run.report);
}

/// A host that knows one more host-type method (`discard`) and one more CRIU option (`ghost-limit`) than the
/// plugin migrates a real workload with the plugin's host type and its filesystem driver, both from one library.
/// What the plugin logs and the progress it reports reach each side's log under its name.
#[test]
fn a_revision_2_plugin_migrates_a_real_workload_with_both_of_its_drivers() {
    let lab = lab("abirev2mig");
    let list = lab.path("rev2-mig.toml");
    write_plugin_list(&list, &[rev2_plugin(), workspace_plugin("shared")]);
    let mut w = lab.start_workload("counter", &[]).expect("start the workload");
    let before = probe_ok(&w, w.pid());
    let run = migrate(&lab, &list, "rev2pid", &mut w);
    assert_moved(&lab, &w, &before, &run);
    let r = &run.report;
    assert_eq!(r["htype"], "rev2pid", "{r}");
    assert_eq!(r["fs_driver"], "rev2fs", "{r}");
    // The rounds the old driver reported crossed the boundary intact (it "moves" 4096 bytes in one file a round).
    let rounds = r["fs_round_list"].as_array().cloned().unwrap_or_default();
    assert!(!rounds.is_empty(), "no filesystem rounds in {r}");
    assert!(rounds.iter().all(|x| x["bytes"] == 4096 && x["files"] == 1), "{r}");
    // What the driver said is left (for the stop policy) is in the report: one more round's worth, then none.
    assert!(rounds.iter().all(|x| x["remaining_bytes"] == if x["frozen"] == true { 0 } else { 4096 }), "{r}");
    // Its progress reports reached the source's report: the last one, of the final round, is complete.
    let progress = r["plugin_progress"].as_array().cloned().unwrap_or_default();
    let sync = progress
        .iter()
        .find(|p| p["what"] == "rev2fs sync")
        .unwrap_or_else(|| panic!("no progress of rev2fs sync in the report: {r}"));
    assert_eq!(sync["plugin"], REV2_PLUGIN, "{r}");
    assert!(sync["total"].as_u64().is_some_and(|t| t > 0) && sync["done"] == sync["total"], "{r}");
    assert_eq!(sync["reports"].as_u64(), Some(rounds.len() as u64), "{r}");
    let tag = format!("plugin:{REV2_PLUGIN}]");
    let has = |log: &str, text: &str| log.lines().any(|l| l.contains(&tag) && l.contains(text));
    for (side, log, lines) in [
        (
            "source",
            &run.src_log,
            [
                "rev2pid on the source side for pid",
                "rev2pid found the tree rooted at pid",
                "rev2fs on the source side (host revision 3, progress service: yes)",
                "progress of rev2fs sync: 4096 of 8192",
            ],
        ),
        (
            "destination",
            &run.dst_log,
            [
                "rev2pid on the destination side for pid",
                "built against interface revision 2, host speaks revision 3",
                "rev2fs on the destination side (host revision 3, progress service: yes)",
                "progress of rev2fs sync: 4096 of 8192",
            ],
        ),
    ] {
        for text in lines {
            assert!(has(log, text), "the {side} log has no line '{text}' tagged {tag}:\n{log}");
        }
    }
    assert!(has(&run.src_log, "the migration ended migrated"), "{}", run.src_log);
    assert!(has(&run.dst_log, "the migration ended migrated"), "{}", run.dst_log);
}

/// The template, copied to a directory outside the repository with its phaul-abi dependency pointed at this
/// checkout's, builds there with cargo and loads: both of its drivers are listed at the current revision.
#[test]
fn the_out_of_tree_template_builds_outside_the_repository_and_loads() {
    let lab = lab("template");
    let outside = tempfile::Builder::new().prefix("phaul-plugin-template-").tempdir().expect("a temporary directory");
    assert!(!outside.path().starts_with(repo_root()), "{} is inside the repository", outside.path().display());
    let dir = outside.path().join("my-plugin");
    sync_tree(&repo_root().join("templates/phaul-plugin"), &dir);
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("the template's Cargo.toml");
    let dep = "phaul-abi = { path = \"../../phaul-abi\" }";
    assert!(text.contains(dep), "the template no longer depends on phaul-abi by `{dep}`:\n{text}");
    let abi = repo_root().join("phaul-abi");
    std::fs::write(&manifest, text.replace(dep, &format!("phaul-abi = {{ path = \"{}\" }}", abi.display())))
        .expect("point the template at this checkout's phaul-abi");
    let so = cargo_build(&manifest, "libphaul_plugin_example.so").unwrap_or_else(|e| panic!("{e}"));
    let list = lab.path("template.toml");
    write_plugin_list(&list, std::slice::from_ref(&so));
    let all = plugins_json(&lab, &list);
    for (kind, name) in [("htype", "example"), ("fs", "example-fs")] {
        let p = driver(&all, kind, name);
        assert_eq!(p["abi_revision"], PHAUL_ABI_VERSION, "{p}");
        assert_eq!(p["file"], so.display().to_string(), "{p}");
    }
}
