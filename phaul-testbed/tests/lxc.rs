//! The `lxc` host type against real LXC 5.0 (Debian's `lxc`), real CRIU and real network namespaces: a busybox
//! container made by LXC's own template moves from host A's LXC path to host B's, with its root filesystem carried
//! by a filesystem driver, and LXC manages it on B afterwards.
//!
//! Needs root, LXC (`scripts/setup` installs it) and iptables (CRIU's network lock for liblxc's restore).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use phaul_testbed::lxc::{lxc_available, read_counter, LxcHosts, BRIDGE_B, LXC_CT_ADDR, LXC_CT_MAC, LXC_ECHO_PORT};
use phaul_testbed::{write_plugins_toml, Lab, MigrateOptions, MigrationRun};

struct Bed {
    lab: Lab,
    lxc: LxcHosts,
}

fn bed(tag: &str) -> Option<Bed> {
    if !lxc_available() {
        eprintln!("skipped: LXC is not installed (run scripts/setup)");
        return None;
    }
    let lab = Lab::new(tag).expect("lab");
    write_plugins_toml(&lab.plugins, &["lxc", "rsync", "shared"]).expect("plugins.toml");
    let lxc = LxcHosts::new(&lab.pair, lab.scratch.path()).expect("bridges and LXC paths");
    Some(Bed { lab, lxc })
}

impl Bed {
    /// `phaul migrate lxc NAME` from A's LXC path to B's, the root filesystem by rsync.
    fn migrate(&self, name: &str, mut opts: MigrateOptions) -> MigrationRun {
        let (pa, pb) = (self.lxc.path_a.display().to_string(), self.lxc.path_b.display().to_string());
        opts.target = Some(("lxc".into(), name.into()));
        opts.src_args.extend(["--htype-opt".into(), format!("lxcpath={pa}"), "--fs".into(), "rsync".into()]);
        opts.dst_args.extend([
            "--htype-opt".into(),
            format!("lxc:lxcpath={pb}"),
            "--fs-opt".into(),
            format!("rsync:map={pa}/{name}/rootfs={pb}/{name}/rootfs"),
        ]);
        if !opts.dst_args.iter().any(|a| a.starts_with("lxc:bridge=")) {
            opts.dst_args.extend(["--htype-opt".into(), format!("lxc:bridge={BRIDGE_B}")]);
        }
        self.lab.migrate(0, opts).expect("migration ran")
    }

    fn counter(&self, path: &Path, name: &str) -> Option<u64> {
        read_counter(&path.join(name).join("rootfs/counter"))
    }
}

/// A TCP client in host A with an established connection to the container's echo server.
fn connect_client(lab: &Lab) -> TcpStream {
    lab.a()
        .in_netns(Duration::from_secs(10), || {
            let s = TcpStream::connect_timeout(
                &format!("{LXC_CT_ADDR}:{LXC_ECHO_PORT}").parse().expect("address"),
                Duration::from_secs(5),
            )
            .expect("connect to the container's echo server");
            s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            s
        })
        .expect("a client in host A")
}

fn echo(s: &mut TcpStream, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut got = String::new();
    r.read_line(&mut got).expect("the echo came back");
    got.trim_end().to_string()
}

fn ok(run: &MigrationRun) {
    assert!(run.succeeded(), "the migration failed:\n{}", run.describe());
}

#[test]
fn busybox_container_moves_and_lxc_manages_it_on_b() {
    let Some(mut b) = bed("lxc-ok") else { return };
    let name = LxcHosts::unique_name("bb");
    b.lxc.create_busybox(&name, &[]).expect("container");
    let old_pid = b.lxc.start_a(&name).expect("started on A");
    let mut client = connect_client(&b.lab);
    assert_eq!(echo(&mut client, "before"), "before");
    let before = b.counter(&b.lxc.path_a, &name).expect("counter on A");

    let run = b.migrate(&name, MigrateOptions::default());
    ok(&run);

    // LXC on B manages it: RUNNING with a new init, lxc-attach works inside it.
    assert_eq!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("RUNNING"), "{}", run.describe());
    let new_pid = b.lxc.init_pid(&b.lxc.path_b, &name).expect("B's init pid");
    assert_ne!(new_pid, old_pid);
    let ps = b.lxc.attach(&b.lxc.path_b, &name, &["ps"]).expect("lxc-attach on B");
    assert!(ps.contains("nc -ll"), "the echo server runs on B:\n{ps}");
    // Its interface kept its name, MAC and address, and its host side is on B's bridge.
    let ip = b.lxc.attach(&b.lxc.path_b, &name, &["ip", "addr", "show", "eth0"]).expect("ip addr in the container");
    assert!(ip.contains(LXC_CT_MAC) && ip.contains(&format!("{LXC_CT_ADDR}/24")), "eth0 on B:\n{ip}");
    let br = b.lab.b().run("ip", ["-o", "link", "show", "master", BRIDGE_B]).expect("ip link");
    let br = String::from_utf8_lossy(&br.stdout).into_owned();
    assert!(br.lines().any(|l| l.contains("veth")), "a veth of the container on {BRIDGE_B}:\n{br}");

    // The counter goes on from where it was, on B's files.
    std::thread::sleep(Duration::from_millis(600));
    let after = b.counter(&b.lxc.path_b, &name).expect("counter on B");
    assert!(after > before, "the counter went on on B ({before} -> {after})");
    // The connection made before the migration still works.
    assert_eq!(echo(&mut client, "after"), "after");

    // A's container is stopped, kept, and cannot be started by mistake.
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    let cfg_a = std::fs::read_to_string(b.lxc.path_a.join(&name).join("config")).expect("A's config kept");
    assert!(cfg_a.contains("lxc.start.auto = 0"), "{cfg_a}");
    assert!(b.lxc.path_a.join(&name).join("rootfs/bin/busybox").exists(), "A's rootfs kept");
    let pa = b.lxc.path_a.display().to_string();
    match b.lab.a().run("lxc-start", ["-P", &pa, "-n", &name, "-F"]) {
        Err(phaul_testbed::TestbedError::CommandFailed { stderr, .. }) => {
            assert!(stderr.contains("lxc.hook.pre-start"), "refused by phaul's pre-start hook:\n{stderr}")
        }
        other => panic!("a stray lxc-start on A must fail, got {other:?}"),
    }
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    // B's config points at B's files and bridge.
    let cfg_b = std::fs::read_to_string(b.lxc.path_b.join(&name).join("config")).expect("B's config");
    assert!(cfg_b.contains(&format!("lxc.rootfs.path = dir:{}", b.lxc.path_b.join(&name).join("rootfs").display())));
    assert!(cfg_b.contains(&format!("lxc.net.0.link = {BRIDGE_B}")));
    let report = run.report.as_ref().expect("report");
    assert_eq!(report["htype"], "lxc", "{report}");

    // lxc-stop on B stops it cleanly.
    assert!(b.lxc.stop(&b.lxc.path_b, &name, &["-t", "20"]), "lxc-stop on B");
    assert_eq!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("STOPPED"));
}
