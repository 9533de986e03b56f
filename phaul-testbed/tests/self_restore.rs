//! A host type that restores the workload itself (`HostType::restores_itself`), as liblxc's and vzctl's will:
//! it runs `criu restore` as a command with phaul's action script, and phaul still holds the restored tree until
//! the commit. The host type is the `selfpid` fixture (phaul-testbed/fixtures/plugin-selfrestore); CRIU, the
//! workload and the two hosts are real.

mod common;

use std::path::PathBuf;

use common::*;
use phaul_testbed::fault::{kill_at, Side};
use phaul_testbed::{write_plugins_toml, Lab, MigrateOptions};

fn self_lab(tag: &str) -> (Lab, PathBuf) {
    let lab = lab(tag);
    let plugins = lab.path("plugins-selfpid.toml");
    write_plugins_toml(&plugins, &["selfpid", "shared"]).expect("plugins.toml");
    (lab, plugins)
}

fn options(pid: i32, plugins: &std::path::Path) -> MigrateOptions {
    MigrateOptions {
        target: Some(("selfpid".into(), pid.to_string())),
        src_plugins: Some(plugins.to_path_buf()),
        dst_plugins: Some(plugins.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn a_host_type_that_restores_by_itself_is_held_until_the_commit() {
    let (lab, plugins) = self_lab("selfrestore");
    let mut w = lab.start_workload("counter", &[]).expect("start");
    let mut opts = options(w.pid(), &plugins);
    opts.dst_args = vec!["-v".into()];
    let m = migrate_and_check(&lab, &mut w, opts);
    let r = m.run.report.clone().expect("report");
    assert_eq!(r["htype"], "selfpid", "{r}");
    assert_eq!(r["handover"]["committed"], true, "{r}");
    // The restore went through the host type's own `criu restore`, and its post-restore reached phaul.
    assert!(m.run.dst_stderr.contains("restores the workload itself"), "{}", m.run.describe());
    assert!(m.run.dst_stderr.contains(&format!("restored the workload as pid {}", m.restored)), "{}", m.run.describe());
}

#[test]
fn a_self_restore_without_the_action_script_is_refused_and_discarded() {
    let (lab, plugins) = self_lab("selfrestore-noscript");
    let w = lab.start_workload("counter", &[]).expect("start");
    let mut opts = options(w.pid(), &plugins);
    opts.dst_args = vec!["--htype-opt".into(), "selfpid:no-script=1".into()];
    let run = lab.migrate(w.pid(), opts).expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(run.src_stderr.contains("without running phaul's action script"), "{}", run.describe());
}

#[test]
fn a_destination_killed_inside_the_self_restores_hold_leaves_the_source_running() {
    let (lab, plugins) = self_lab("selfrestore-kill");
    let w = lab.start_workload("counter", &[]).expect("start");
    let mut opts = options(w.pid(), &plugins);
    let file = lab.path("fault.json");
    kill_at(&mut opts, "dst:notify:post-restore", Side::Dst, file.clone());
    let run = lab.migrate(w.pid(), opts).expect("run");
    assert!(file.exists(), "dst:notify:post-restore was never reached:\n{}", run.describe());
    // phaul serve died holding the tree: the action script got no answer, CRIU failed the restore and killed
    // what it restored; the source, which never sent Commit, resumed its own copy.
    assert_still_on_source(&lab, &w, &run);
}
