//! Bad input gets a clear error naming the problem and what to do, and the workload is never touched.

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use phaul_core::proto::wire::envelope::Body;
use phaul_core::proto::wire::{CriuVersion, Hello, HelloReply};
use phaul_core::proto::PROTOCOL_VERSION;
use phaul_core::transport::{Channel, ChannelName};
use phaul_core::wire;
use phaul_testbed::{locate_binary, Lab};

fn plugin_dir() -> std::path::PathBuf {
    locate_binary("phaul").expect("phaul").parent().expect("dir").to_path_buf()
}

fn phaul_fails(lab: &Lab, args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = lab.phaul(args, &[]).expect("run phaul");
    assert_eq!(out.status.code(), Some(code), "args {args:?}\nstdout {}\nstderr {}", out.stdout, out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "expected {n:?} in:\n{}", out.stderr);
    }
    out.stderr
}

#[test]
fn malformed_plugins_toml_names_line_and_column() {
    let lab = lab("badtoml");
    let p = lab.path("broken.toml");
    std::fs::write(&p, "[[plugin]]\npath = \"x.so\"\nenabled = maybe\n").expect("write");
    phaul_fails(
        &lab,
        &["--plugins", &p.display().to_string(), "plugins"],
        2,
        &["not a valid plugin list", "line 3", "column"],
    );
}

#[test]
fn missing_plugin_file_is_named() {
    let lab = lab("missing");
    let p = lab.path("missing.toml");
    std::fs::write(&p, "[[plugin]]\npath = \"/nonexistent/libphaul_htype_zfs.so\"\n").expect("write");
    phaul_fails(
        &lab,
        &["--plugins", &p.display().to_string(), "plugins"],
        2,
        &["/nonexistent/libphaul_htype_zfs.so", "does not exist"],
    );
}

#[test]
fn a_library_that_is_not_a_phaul_plugin() {
    let lab = lab("notplugin");
    let p = lab.path("notplugin.toml");
    // A real shared library (the C library's math part) without phaul's root module.
    let libm = ["/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib/x86_64-linux-gnu/libm.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libm");
    std::fs::write(&p, format!("[[plugin]]\npath = \"{libm}\"\n")).expect("write");
    phaul_fails(&lab, &["--plugins", &p.display().to_string(), "plugins"], 2, &["is not a phaul plugin", libm]);
    // And a file that is not a library at all.
    let fake = lab.path("fake.so");
    std::fs::write(&fake, "not an ELF object").expect("write");
    std::fs::write(&p, format!("[[plugin]]\npath = \"{}\"\n", fake.display())).expect("write");
    phaul_fails(
        &lab,
        &["--plugins", &p.display().to_string(), "plugins"],
        2,
        &["cannot be loaded as a shared library"],
    );
}

#[test]
fn a_plugin_of_a_newer_abi_is_refused_naming_the_file_and_both_revisions() {
    let lab = lab("abi");
    let p = lab.path("abi.toml");
    let so = plugin_dir().join("libphaul_fixture_plugin_future_abi.so");
    std::fs::write(&p, format!("[[plugin]]\npath = \"{}\"\n", so.display())).expect("write");
    phaul_fails(
        &lab,
        &["--plugins", &p.display().to_string(), "plugins"],
        2,
        &["libphaul_fixture_plugin_future_abi.so", "revision 4, newer than this phaul's 3", "rebuild"],
    );
}

#[test]
fn two_plugins_with_one_name() {
    let lab = lab("dup");
    let p = lab.path("dup.toml");
    let so = plugin_dir().join("libphaul_htype_pid.so");
    let copy = lab.path("libcopy_of_pid.so");
    std::fs::copy(&so, &copy).expect("copy");
    std::fs::write(&p, format!("[[plugin]]\npath = \"{}\"\n[[plugin]]\npath = \"{}\"\n", so.display(), copy.display()))
        .expect("write");
    phaul_fails(&lab, &["--plugins", &p.display().to_string(), "plugins"], 2, &["two plugins are named 'pid'"]);
}

#[test]
fn plugins_lists_kind_name_version_and_file() {
    let lab = lab("list");
    let out = lab.phaul(&["--plugins", &lab.plugins.display().to_string(), "plugins"], &[]).expect("run");
    assert!(out.status.success(), "{}", out.stderr);
    for needle in ["htype", "pid", "fs", "shared", "external", "0.1.0", "libphaul_htype_pid.so", "default fs: shared"] {
        assert!(out.stdout.contains(needle), "{needle:?} missing from:\n{}", out.stdout);
    }
}

#[test]
fn a_driver_that_is_not_enabled() {
    let lab = lab("noteenabled");
    let w = lab.start_workload("counter", &[]).expect("start");
    let pid = w.pid().to_string();
    phaul_fails(
        &lab,
        &[
            "--plugins",
            &lab.plugins.display().to_string(),
            "migrate",
            "pid",
            &pid,
            "--to",
            "127.0.0.1:1",
            "--insecure-loopback",
            "--fs",
            "zfs",
        ],
        1,
        &[
            "no filesystem driver named 'zfs' is installed and enabled",
            "enabled of that kind: shared, external",
            "keeps running",
        ],
    );
    probe_ok(&w, w.pid());
}

#[test]
fn a_pid_that_does_not_exist() {
    let lab = lab("nopid");
    phaul_fails(
        &lab,
        &[
            "--plugins",
            &lab.plugins.display().to_string(),
            "migrate",
            "pid",
            "999999999",
            "--to",
            "127.0.0.1:1",
            "--insecure-loopback",
        ],
        1,
        &["no process with pid 999999999"],
    );
    phaul_fails(
        &lab,
        &[
            "--plugins",
            &lab.plugins.display().to_string(),
            "migrate",
            "pid",
            "twelve",
            "--to",
            "127.0.0.1:1",
            "--insecure-loopback",
        ],
        1,
        &["'twelve' is not a pid"],
    );
}

#[test]
fn a_pid_that_is_not_a_pid_namespace_init() {
    let lab = lab("notinit");
    let mut sleeper = lab.a().command("sleep", ["30"]).spawn().expect("sleep");
    let pid = sleeper.id().to_string();
    let err = phaul_fails(
        &lab,
        &[
            "--plugins",
            &lab.plugins.display().to_string(),
            "migrate",
            "pid",
            &pid,
            "--to",
            "127.0.0.1:1",
            "--insecure-loopback",
        ],
        1,
        &["is not the init of its own pid namespace", "unshare --pid --fork"],
    );
    assert!(err.contains("keeps running"), "{err}");
    assert!(sleeper.try_wait().expect("wait").is_none(), "the process was harmed");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn fd_arguments_that_are_not_sockets() {
    let lab = lab("fds");
    let plugins = lab.plugins.display().to_string();
    let file: OwnedFd = File::open("/etc/hostname").expect("open").into();
    let (a, _b) = UnixStream::pair().expect("pair");
    let sock: OwnedFd = a.into();
    let args = ["--plugins", &plugins, "serve", "--fdrpc", "3", "--fdmem", "4"];
    let out = lab.phaul(&args, &[(file, 3), (sock, 4)]).expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("fd 3 given to --fdrpc is a regular file, not a socket"), "{}", out.stderr);
    // A descriptor that is not open at all.
    phaul_fails(
        &lab,
        &["--plugins", &plugins, "serve", "--fdrpc", "7", "--fdmem", "8"],
        2,
        &["fd 7 given to --fdrpc is not open"],
    );
    // The same descriptor for two channels.
    let (a, _b) = UnixStream::pair().expect("pair");
    let out =
        lab.phaul(&["--plugins", &plugins, "serve", "--fdrpc", "3", "--fdmem", "3"], &[(a.into(), 3)]).expect("run");
    assert!(out.stderr.contains("is given to both --fdrpc and --fdmem"), "{}", out.stderr);
}

#[test]
fn serve_refuses_to_listen_without_tls_and_insecure_beyond_loopback() {
    let lab = lab("listen");
    let plugins = lab.plugins.display().to_string();
    phaul_fails(
        &lab,
        &["--plugins", &plugins, "--config", "/nonexistent-phaul.toml", "serve", "--listen", "127.0.0.1:0"],
        2,
        &["cannot read the settings file /nonexistent-phaul.toml"],
    );
    phaul_fails(
        &lab,
        &["--plugins", &plugins, "serve", "--listen", "127.0.0.1:0"],
        2,
        &["need TLS", "--tls-cert", "--insecure-loopback"],
    );
    phaul_fails(
        &lab,
        &["--plugins", &plugins, "serve", "--listen", "10.91.0.1:0", "--insecure-loopback"],
        2,
        &["refusing to listen on 10.91.0.1:0 without TLS", "phaul cert"],
    );
}

fn channel(fd: UnixStream, name: ChannelName) -> Channel {
    let c = Channel::new(name, OwnedFd::from(fd));
    c.set_read_timeout(Duration::from_secs(30)).expect("timeout");
    c
}

/// A source from the future greets `phaul serve`: the destination refuses, saying which versions met.
#[test]
fn a_source_speaking_another_protocol_version() {
    let lab = lab("protosrc");
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let (mem_ours, mem_theirs) = UnixStream::pair().expect("pair");
    let plugins = lab.plugins.display().to_string();
    let mut cmd = lab.a().command(&lab.phaul, ["--plugins", &plugins, "serve", "--fdrpc", "3", "--fdmem", "4"]);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let theirs: OwnedFd = theirs.into();
    let mem_theirs: OwnedFd = mem_theirs.into();
    use std::os::fd::AsFd;
    let child = phaul_testbed::spawn_with_fds(cmd, &[(theirs.as_fd(), 3), (mem_theirs.as_fd(), 4)]).expect("spawn");
    drop(theirs);
    drop(mem_theirs);
    let mut rpc = channel(ours, ChannelName::Rpc);
    let hello = Hello {
        protocol_version: 999,
        phaul_version: "9.9.9".into(),
        criu: Some(CriuVersion { major: 4, minor: 2, sublevel: 1, text: "4.2.1".into() }),
        session: "s".into(),
        skip_criu_check: false,
        timeout_ms: 0,
    };
    let reply = wire::request(&mut rpc, Body::Hello(hello));
    let err = reply.expect_err("the destination must refuse").to_string();
    let want = format!("the source speaks phaul protocol version 999, this destination speaks {PROTOCOL_VERSION}");
    assert!(err.contains(&want), "{err}");
    let out = phaul_testbed::collect(child, Duration::from_secs(30), "serve").expect("serve");
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    drop(mem_ours);
}

/// `phaul migrate` meets a destination from the future: it stops before touching the workload.
#[test]
fn a_destination_speaking_another_protocol_version() {
    let lab = lab("protodst");
    let w = lab.start_workload("counter", &[]).expect("start");
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let (mem_ours, mem_theirs) = UnixStream::pair().expect("pair");
    let fake = std::thread::spawn(move || {
        let mut rpc = channel(ours, ChannelName::Rpc);
        if let Ok(Body::Hello(_)) = wire::recv(&mut rpc) {
            let _ = wire::send(
                &mut rpc,
                Body::HelloReply(HelloReply {
                    protocol_version: 999,
                    phaul_version: "9.9.9".into(),
                    criu: None,
                    features: Vec::new(),
                    timeout_ms: 0,
                }),
            );
        }
        let _ = wire::recv(&mut rpc);
        drop(mem_ours);
    });
    let pid = w.pid().to_string();
    let plugins = lab.plugins.display().to_string();
    let out = lab
        .phaul(
            &["--plugins", &plugins, "migrate", "pid", &pid, "--fdrpc", "3", "--fdmem", "4"],
            &[(theirs.into(), 3), (mem_theirs.into(), 4)],
        )
        .expect("run");
    let _ = fake.join();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let want = format!("the destination speaks phaul protocol version 999, this source speaks {PROTOCOL_VERSION}");
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    assert!(out.stderr.contains("keeps running"), "{}", out.stderr);
    probe_ok(&w, w.pid());
}

/// phaul runs plugin code with its own privileges (root, for serve): a plugin list or a plugin library that
/// someone else could change is refused, naming the file and the fix; so is a plugin list that is not a regular
/// file (`/dev/zero` would otherwise be read for ever) or is too large.
#[test]
fn plugin_files_others_could_change_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab("unsafeplug");
    let chmod =
        |p: &std::path::Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    // A plugin list writable by others.
    let list = lab.path("writable.toml");
    std::fs::copy(&lab.plugins, &list).expect("copy the plugin list");
    chmod(&list, 0o666);
    let l = list.display().to_string();
    phaul_fails(&lab, &["--plugins", &l, "plugins"], 2, &["refusing the plugin list", &l, "mode 0666", "chmod go-w"]);
    // A plugin library writable by its group, listed in a safe list.
    let lib = lab.path("libphaul_htype_pid.so");
    std::fs::copy(plugin_dir().join("libphaul_htype_pid.so"), &lib).expect("copy the pid plugin");
    chmod(&lib, 0o775);
    let safe = lab.path("safe.toml");
    std::fs::write(&safe, format!("[[plugin]]\npath = \"{}\"\n", lib.display())).expect("write");
    let s = safe.display().to_string();
    let ld = lib.display().to_string();
    phaul_fails(&lab, &["--plugins", &s, "plugins"], 2, &["refusing the plugin file", &ld, "mode 0775"]);
    // A plugin library owned by another user.
    chmod(&lib, 0o755);
    nix::unistd::chown(&lib, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    phaul_fails(&lab, &["--plugins", &s, "plugins"], 2, &["refusing the plugin file", "belongs to uid 65534"]);
    // A list in a directory anyone may change.
    let open_dir = lab.path("open-dir");
    std::fs::create_dir(&open_dir).expect("mkdir");
    chmod(&open_dir, 0o777);
    let in_open = open_dir.join("plugins.toml");
    std::fs::copy(&lab.plugins, &in_open).expect("copy");
    phaul_fails(&lab, &["--plugins", &in_open.display().to_string(), "plugins"], 2, &["its directory", "0777"]);
    // Not a regular file, and too large.
    phaul_fails(&lab, &["--plugins", "/dev/zero", "plugins"], 2, &["/dev/zero", "not a regular file"]);
    let big = lab.path("big.toml");
    std::fs::write(&big, "#".repeat(2 << 20)).expect("write");
    phaul_fails(&lab, &["--plugins", &big.display().to_string(), "plugins"], 2, &["larger than 1024 KiB"]);
    // The safe list still works.
    let out = lab.phaul(&["--plugins", &lab.plugins.display().to_string(), "plugins"], &[]).expect("plugins");
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn restart_mode_with_a_host_type_that_cannot_restart_is_refused_before_anything_stops() {
    let lab = lab("norestart");
    let w = lab.start_workload("counter", &[]).expect("start");
    let run = lab
        .migrate(
            w.pid(),
            phaul_testbed::MigrateOptions { src_args: vec!["--mode".into(), "restart".into()], ..Default::default() },
        )
        .expect("run");
    assert_still_on_source(&lab, &w, &run);
    assert!(
        run.src_stderr
            .contains("the 'pid' host type cannot stop and start its workload, so --mode restart cannot move it"),
        "{}",
        run.describe()
    );
}
