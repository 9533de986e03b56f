//! An installed phaul (`scripts/install`), as an operator gets it: staged with `--destdir` into a scratch
//! directory, then seen at its real paths (/usr/local, /etc/phaul) in a mount namespace of its own whose /usr and
//! /etc are overlays of the machine's with the staged files on top, so the machine's own /usr and /etc are not
//! touched. There the installed phaul runs from an unrelated working directory, with no `--plugins`: it finds
//! /etc/phaul/plugins.toml and /etc/phaul/plugins.d itself, lists its drivers, and migrates a workload.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use phaul_testbed::MigrateOptions;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `scripts/install --destdir STAGE --no-build --profile debug` (the test build's files), with `extra` options.
fn install(stage: &Path, extra: &[&str]) {
    let out = Command::new(repo().join("scripts/install"))
        .args(["--destdir", &stage.display().to_string(), "--no-build", "--profile", "debug"])
        .args(extra)
        .output()
        .expect("scripts/install");
    assert!(
        out.status.success(),
        "scripts/install {extra:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process holding a mount namespace whose /usr and /etc show the staged install over the machine's.
struct InstalledRoot {
    holder: std::process::Child,
    /// The installed phaul (`/usr/local/bin/phaul`, `/usr/bin/phaul` from the package).
    bin: String,
}

impl InstalledRoot {
    fn new(stage: &Path, work: &Path) -> InstalledRoot {
        InstalledRoot::with_bin(stage, work, "/usr/local/bin/phaul")
    }

    fn with_bin(stage: &Path, work: &Path, bin: &str) -> InstalledRoot {
        let mut script = String::new();
        for d in ["usr", "etc"] {
            let (upper, wd) = (stage.join(d), work.join(d));
            std::fs::create_dir_all(&upper).expect("upper");
            std::fs::create_dir_all(&wd).expect("workdir");
            script.push_str(&format!(
                "mount -t overlay overlay -o lowerdir=/{d},upperdir={},workdir={} /{d} || exit 97; ",
                upper.display(),
                wd.display()
            ));
        }
        script.push_str("exec sleep 86400");
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let root = InstalledRoot { holder, bin: bin.to_string() };
        let deadline = Instant::now() + Duration::from_secs(10);
        let phaul = format!("/proc/{}/root{bin}", root.holder.id());
        let comm = format!("/proc/{}/comm", root.holder.id());
        while !(std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep") && Path::new(&phaul).exists()) {
            assert!(Instant::now() < deadline, "the installed root's mount namespace did not come up in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        root
    }

    /// `nsenter --mount --target HOLDER --`: a command prefix into this namespace.
    fn prefix(&self) -> Vec<String> {
        ["nsenter", "--mount", "--target", &self.holder.id().to_string(), "--"].iter().map(|s| s.to_string()).collect()
    }

    /// The installed phaul, from `/` (an unrelated working directory), with `args`: (success, stdout, stderr).
    fn phaul(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--mount", "--target", &self.holder.id().to_string(), "--wd=/", "--", &self.bin]);
        let out = cmd.args(args).stdin(Stdio::null()).output().expect("nsenter phaul");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A wrapper for [`MigrateOptions`] that runs the installed phaul there, from `/`, in place of the test build.
    fn wrapper(&self) -> (PathBuf, Vec<String>) {
        let script = format!("shift 2; cd / && exec {} \"$@\"", self.bin);
        let args = ["--mount", "--target", &self.holder.id().to_string(), "--", "/bin/sh", "-c", &script, "sh"];
        (PathBuf::from("/usr/bin/nsenter"), args.iter().map(|s| s.to_string()).collect())
    }
}

impl Drop for InstalledRoot {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn plugins_json(root: &InstalledRoot) -> Vec<Value> {
    let (ok, out, err) = root.phaul(&["plugins", "--json"]);
    assert!(ok, "phaul plugins failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("phaul plugins --json: {e}: {out}"));
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn an_installed_phaul_finds_its_plugins_and_migrates_from_an_unrelated_directory() {
    let lab = lab("install");
    let stage = lab.path("stage");
    install(&stage, &[]);

    // The staged files name their final paths, not the staging directory.
    let list = std::fs::read_to_string(stage.join("etc/phaul/plugins.toml")).expect("plugins.toml");
    assert!(list.contains("path = \"/usr/local/lib/phaul/plugins/libphaul_htype_pid.so\""), "{list}");
    assert!(!list.contains(&stage.display().to_string()), "{list}");
    let lxc = std::fs::read_to_string(stage.join("etc/phaul/plugins.d/50-lxc.toml")).expect("lxc snippet");
    assert!(lxc.contains("libphaul_htype_lxc.so") && lxc.contains("[host-type.lxc]"), "{lxc}");
    let unit = std::fs::read_to_string(stage.join("usr/local/lib/systemd/system/phaul-serve.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/phaul --sysconfdir /etc serve"), "{unit}");
    let socket =
        std::fs::read_to_string(stage.join("usr/local/lib/systemd/system/phaul-serve.socket")).expect("socket");
    assert!(socket.contains("ListenStream=7777") && socket.contains("Accept=no"), "{socket}");
    let man = std::fs::read_to_string(stage.join("usr/local/share/man/man1/phaul-migrate.1")).expect("man page");
    assert!(man.contains(".TH phaul-migrate") && man.contains("\\-\\-to"), "a man page from clap's definitions");
    let bash = std::fs::read_to_string(stage.join("usr/local/share/bash-completion/completions/phaul")).expect("bash");
    assert!(bash.contains("complete") && bash.contains("migrate"), "bash completions");

    let root = InstalledRoot::new(&stage, &lab.path("overlay-work"));
    // systemd's own check of the units, at their installed paths (where the command they run exists).
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let out = Command::new("nsenter")
            .args(["--mount", "--target", &root.holder.id().to_string(), "--", "systemd-analyze", "verify", "--man=no"])
            .args([
                "/usr/local/lib/systemd/system/phaul-serve.socket",
                "/usr/local/lib/systemd/system/phaul-serve.service",
            ])
            .output()
            .expect("systemd-analyze");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !said.contains("phaul-serve"), "systemd-analyze verify:\n{said}");
    }
    let plugins = plugins_json(&root);
    let names: Vec<&str> = plugins.iter().filter_map(|p| p["name"].as_str()).collect();
    for want in ["pid", "lxc", "shared", "external", "rsync", "btrfs", "zfs", "lvm"] {
        assert!(names.contains(&want), "the installed phaul lists {want}: {names:?}");
    }
    for p in &plugins {
        let file = p["file"].as_str().unwrap_or_default();
        assert!(file.starts_with("/usr/local/lib/phaul/plugins/"), "{p}");
    }
    let lxc = plugins.iter().find(|p| p["name"] == "lxc").expect("lxc");
    assert_eq!(lxc["default_fs"], "rsync", "the lxc snippet's default filesystem driver");
    let (_, text, _) = root.phaul(&["plugins"]);
    assert!(text.contains("plugins from /etc/phaul/plugins.toml, /etc/phaul/plugins.d/50-btrfs.toml"), "{text}");

    // A real migration with the installed command and plugins on both sides, no --plugins given.
    let prefix = root.prefix();
    let mut w = lab.start_workload_prefixed(&prefix, "counter", &[]).expect("workload in the installed root");
    let opts = MigrateOptions {
        installed_plugins: true,
        src_wrapper: Some(root.wrapper()),
        dst_wrapper: Some(root.wrapper()),
        ..Default::default()
    };
    let m = migrate_and_check(&lab, &mut w, opts);
    assert_eq!(m.run.report.as_ref().map(|r| r["fs_driver"].clone()), Some(Value::from("shared")));
}

#[test]
fn a_subset_install_reports_a_missing_driver_as_not_installed() {
    let lab = lab("install-subset");
    let stage = lab.path("stage");
    install(&stage, &["--groups", "phaul,btrfs"]);
    assert!(!stage.join("usr/local/lib/phaul/plugins/libphaul_htype_lxc.so").exists());
    assert!(!stage.join("etc/phaul/plugins.d/50-lxc.toml").exists());
    let root = InstalledRoot::new(&stage, &lab.path("overlay-work"));
    let plugins = plugins_json(&root);
    let mut names: Vec<&str> = plugins.iter().filter_map(|p| p["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["btrfs", "external", "pid", "rsync", "shared"]);
    let (ok, _, err) = root.phaul(&["migrate", "lxc", "web", "--to", "127.0.0.1:1", "--insecure-loopback"]);
    assert!(!ok);
    assert!(
        err.contains("no host type named 'lxc' is installed and enabled") && err.contains("phaul-lxc"),
        "the missing driver is named, with the package that ships it:\n{err}"
    );
}

fn sh(program: &str, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A fresh root for dpkg whose package database records as installed only what phaul's packages depend on,
/// copied from this machine's own records (so dependencies resolve as on this machine, and nothing else is there).
fn fresh_dpkg_root(root: &Path, deps: &[&str]) {
    let db = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(db.join(d)).expect("dpkg dirs");
    }
    let mut status = String::new();
    for d in deps {
        let (ok, text) = sh("dpkg-query", &["-s", d]);
        assert!(ok, "{d} is not installed on this machine (scripts/setup installs it): {text}");
        status.push_str(text.trim_end());
        status.push_str("\n\n");
        std::fs::write(db.join("info").join(format!("{d}.list")), "").expect("list");
    }
    std::fs::write(db.join("status"), status).expect("status");
    std::fs::write(db.join("available"), "").expect("available");
}

#[test]
fn debian_packages_install_into_a_fresh_root_and_a_driver_needs_the_interface_it_was_built_for() {
    let lab = lab("debs");
    let debs = lab.path("debs");
    let out = Command::new(repo().join("scripts/package"))
        .args(["--no-build", "--profile", "debug", "--compress", "none", "--out", &debs.display().to_string()])
        .output()
        .expect("scripts/package");
    assert!(out.status.success(), "scripts/package: {}", String::from_utf8_lossy(&out.stderr));
    let deb = |name: &str| -> String {
        std::fs::read_dir(&debs)
            .expect("debs")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|x| x == "deb")
                    && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}_")))
            })
            .unwrap_or_else(|| panic!("no {name} package"))
            .display()
            .to_string()
    };
    let (phaul, lxc) = (deb("phaul"), deb("phaul-lxc"));
    let field = |deb: &str, f: &str| sh("dpkg-deb", &["-f", deb, f]).1.trim().to_string();
    let abi = format!("phaul-plugin-abi-{}", phaul_core::abi::PHAUL_ABI_VERSION);
    assert!(field(&phaul, "Provides").contains(&abi), "{}", field(&phaul, "Provides"));
    assert!(field(&lxc, "Depends").contains(&abi), "{}", field(&lxc, "Depends"));
    assert!(
        field(&phaul, "Depends").contains("libc6"),
        "dpkg-shlibdeps found the libraries: {}",
        field(&phaul, "Depends")
    );
    assert!(field(&phaul, "Description").contains("/opt/phaul/criu"), "the package says how it gets a CRIU");
    let (_, contents) = sh("dpkg-deb", &["-c", &lxc]);
    assert!(contents.contains("./etc/phaul/plugins.d/50-lxc.toml"), "{contents}");
    assert!(contents.contains("./usr/lib/phaul/plugins/libphaul_htype_lxc.so"), "{contents}");
    assert!(!contents.contains("./usr/bin/"), "a driver package holds no command: {contents}");

    let root = lab.path("root");
    fresh_dpkg_root(&root, &["libc6", "libgcc-s1", "rsync", "nftables", "iproute2", "lxc", "iptables"]);
    let r = root.display().to_string();
    let dpkg = |args: &[&str]| {
        let mut all = vec!["--root", r.as_str(), "--log=/dev/null"];
        all.extend_from_slice(args);
        sh("dpkg", &all)
    };
    // A driver without a phaul that speaks its interface is not configured.
    let (ok, text) = dpkg(&["-i", &lxc]);
    assert!(!ok && text.contains(&abi), "dpkg must refuse phaul-lxc without {abi}:\n{text}");
    let (ok, text) = dpkg(&["-i", &phaul, &lxc]);
    assert!(ok, "dpkg -i phaul phaul-lxc:\n{text}");
    for p in ["phaul", "phaul-lxc"] {
        let (_, st) = sh("dpkg-query", &["--admindir", &format!("{r}/var/lib/dpkg"), "-W", "-f", "${Status}", p]);
        assert_eq!(st.trim(), "install ok installed", "{p}");
    }

    // The packaged phaul at its real paths: the lists it reads, the drivers it has and has not.
    let inst = InstalledRoot::with_bin(&root, &lab.path("overlay-work"), "/usr/bin/phaul");
    let plugins = plugins_json(&inst);
    let mut names: Vec<&str> = plugins.iter().filter_map(|p| p["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["external", "lxc", "pid", "rsync", "shared"], "phaul and phaul-lxc, not phaul-btrfs");
    assert!(plugins.iter().all(|p| p["file"].as_str().is_some_and(|f| f.starts_with("/usr/lib/phaul/plugins/"))));
    let prefix = inst.prefix();
    let mut w = lab.start_workload_prefixed(&prefix, "counter", &[]).expect("workload in the packaged root");
    let pid = w.pid().to_string();
    let (ok, _, err) =
        inst.phaul(&["migrate", "pid", &pid, "--fs", "btrfs", "--to", "127.0.0.1:1", "--insecure-loopback"]);
    assert!(
        !ok && err.contains("no filesystem driver named 'btrfs' is installed") && err.contains("phaul-btrfs"),
        "{err}"
    );
    // ... and migrates with what the packages installed (the workload ran on through the refusal above).
    let opts = MigrateOptions {
        installed_plugins: true,
        src_wrapper: Some(inst.wrapper()),
        dst_wrapper: Some(inst.wrapper()),
        ..Default::default()
    };
    migrate_and_check(&lab, &mut w, opts);
    drop(inst);

    // Removing a driver package (not purging it) leaves its snippet, a conffile, behind without its library:
    // phaul goes on without the driver.
    let (ok, text) = dpkg(&["-r", "phaul-lxc"]);
    assert!(ok, "dpkg -r phaul-lxc:\n{text}");
    assert!(!root.join("usr/lib/phaul/plugins/libphaul_htype_lxc.so").exists());
    assert!(root.join("etc/phaul/plugins.toml").exists(), "phaul's own list stays");
    let inst = InstalledRoot::with_bin(&root, &lab.path("overlay-work-2"), "/usr/bin/phaul");
    let mut names: Vec<String> =
        plugins_json(&inst).iter().filter_map(|p| p["name"].as_str().map(str::to_string)).collect();
    names.sort();
    assert_eq!(names, ["external", "pid", "rsync", "shared"]);
    // A snippet left behind without its library (say, by hand) only disables its entry.
    std::fs::write(
        root.join("etc/phaul/plugins.d/60-gone.toml"),
        "[[plugin]]\npath = \"/usr/lib/phaul/plugins/libphaul_gone.so\"\n",
    )
    .expect("stale snippet");
    let (ok, _, err) = inst.phaul(&["plugins"]);
    assert!(ok, "a stale snippet must not break phaul: {err}");
}

/// scripts/setup (and the LXC tests' Debian container) take the Debian archive from apt's own configuration.
#[test]
fn the_setup_mirror_is_the_one_apt_is_configured_with() {
    let mirror = |files: &[(&str, &str)]| -> String {
        let apt = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(apt.path().join("sources.list.d")).expect("mkdir");
        for (name, text) in files {
            std::fs::write(apt.path().join(name), text).expect("write");
        }
        let out = Command::new(repo().join("scripts/apt-mirror")).env("APT_DIR", apt.path()).output().expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let one_line = "# a comment\ndeb http://security.debian.org/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n";
    assert_eq!(mirror(&[("sources.list", one_line)]), "http://mirror.example/debian");
    let deb822 = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n\
                  Types: deb-src deb\nURIs: https://on.example/debian\nSuites: bookworm\n";
    assert_eq!(mirror(&[("sources.list.d/debian.sources", deb822)]), "https://on.example/debian");
    let disabled = "deb http://ignored.example/debian bookworm main\n";
    assert_eq!(mirror(&[("sources.list.d/x.list.disabled", disabled)]), "http://deb.debian.org/debian");
    assert_eq!(mirror(&[]), "http://deb.debian.org/debian");
}
