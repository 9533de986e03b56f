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

use phaul_testbed::lxc::{lxc_available, LxcHosts, BRIDGE_B, LXC_CT_ADDR, LXC_CT_MAC, LXC_ECHO_PORT};
use phaul_testbed::storage::{LoopBtrfs, ZfsHost};
use phaul_testbed::{write_plugins_toml, Lab, MigrateOptions, MigrationRun};

/// Fields drop in order: the containers (`lxc`) go before the hosts' filesystems, and those before the lab's
/// scratch directory and network namespaces.
struct Bed {
    lxc: LxcHosts,
    /// The filesystem driver that carries the root filesystem.
    fs: &'static str,
    /// Each host's btrfs, when the LXC paths are on btrfs.
    _btrfs: Vec<LoopBtrfs>,
    /// Each host's ZFS (a zfs-fuse daemon whose mount namespace is the host's), when the root is a dataset.
    zfs: Vec<ZfsHost>,
    lab: Lab,
}

/// Whether LXC is installed; without it the test is skipped, except under `scripts/test` (which installs it and
/// sets `PHAUL_REQUIRE_ALL=1`), where a missing LXC is a failure rather than a silent pass.
fn lxc_here() -> bool {
    if lxc_available() {
        return true;
    }
    assert!(
        std::env::var_os("PHAUL_REQUIRE_ALL").is_none(),
        "LXC is not installed, and PHAUL_REQUIRE_ALL asks for every test to run: run scripts/setup"
    );
    eprintln!("skipped: LXC is not installed (run scripts/setup)");
    false
}

/// A lab listing `drivers` (after the lxc host type), when LXC is here.
fn lab_with(tag: &str, drivers: &[&str]) -> Option<Lab> {
    if !lxc_here() {
        return None;
    }
    let lab = Lab::new(tag).expect("lab");
    let mut all = vec!["lxc"];
    all.extend_from_slice(drivers);
    write_plugins_toml(&lab.plugins, &all).expect("plugins.toml");
    Some(lab)
}

fn bed(tag: &str) -> Option<Bed> {
    let lab = lab_with(tag, &["rsync", "shared"])?;
    let lxc = LxcHosts::new(&lab.pair, lab.scratch.path()).expect("bridges and LXC paths");
    Some(Bed { lxc, fs: "rsync", _btrfs: Vec::new(), zfs: Vec::new(), lab })
}

/// A bed whose LXC paths are each on its host's own btrfs (a loop device each), the root filesystem carried by
/// the btrfs driver.
fn btrfs_bed(tag: &str) -> Option<Bed> {
    let lab = lab_with(tag, &["btrfs"])?;
    // Mounted before the hosts' mount namespaces are made, so that each has both.
    let a = LoopBtrfs::new(&lab.path("a.img"), &lab.path("btrfs-a"), 512).expect("A's btrfs");
    let b = LoopBtrfs::new(&lab.path("b.img"), &lab.path("btrfs-b"), 512).expect("B's btrfs");
    let lxc = LxcHosts::new_at(&lab.pair, &a.dir.join("lxc"), &b.dir.join("lxc")).expect("bridges and LXC paths");
    Some(Bed { lxc, fs: "btrfs", _btrfs: vec![a, b], zfs: Vec::new(), lab })
}

/// A bed whose hosts' mount namespaces are their zfs-fuse daemons' (each host its own pool `tank`, mounted at the
/// same path, as on two machines); the containers' root filesystems are datasets, carried by the zfs driver.
fn zfs_bed(tag: &str) -> Option<Bed> {
    let lab = lab_with(tag, &["zfs"])?;
    let mnt = lab.path("tank");
    let a = ZfsHost::new_in(&lab.path("a.img"), "tank", &mnt, 512, Some(lab.a())).expect("A's pool");
    let b = ZfsHost::new_in(&lab.path("b.img"), "tank", &mnt, 512, Some(lab.b())).expect("B's pool");
    let (pa, pb) = (lab.path("lxc-a"), lab.path("lxc-b"));
    let lxc = LxcHosts::new_in(&lab.pair, &pa, &pb, (a.pid(), b.pid())).expect("bridges and LXC paths");
    Some(Bed { lxc, fs: "zfs", _btrfs: Vec::new(), zfs: vec![a, b], lab })
}

impl Bed {
    /// `phaul migrate lxc NAME` from A's LXC path to B's, the root filesystem by the bed's driver.
    fn migrate(&self, name: &str, opts: MigrateOptions) -> MigrationRun {
        self.migrate_inner(name, opts, true)
    }

    /// Without `lxc:bridge=` on B: the container's configuration names the bridge (A's).
    fn migrate_with_config_bridge(&self, name: &str, opts: MigrateOptions) -> MigrationRun {
        self.migrate_inner(name, opts, false)
    }

    fn migrate_inner(&self, name: &str, mut opts: MigrateOptions, bridge_b: bool) -> MigrationRun {
        let (pa, pb) = (self.lxc.path_a.display().to_string(), self.lxc.path_b.display().to_string());
        opts.target = Some(("lxc".into(), name.into()));
        opts.src_wrapper = Some(self.lxc.wrapper(false));
        opts.dst_wrapper = Some(self.lxc.wrapper(true));
        opts.src_args.extend(["--htype-opt".into(), format!("lxcpath={pa}"), "--fs".into(), self.fs.into()]);
        opts.dst_args.extend(["--htype-opt".into(), format!("lxc:lxcpath={pb}")]);
        if self.zfs.is_empty() {
            opts.dst_args.extend(["--fs-opt".into(), format!("{}:map={pa}/{name}/rootfs={pb}/{name}/rootfs", self.fs)]);
        } else {
            // Both pools are mounted at the same path: B receives the dataset where A has it.
            opts.dst_args.extend(["--fs-opt".into(), format!("zfs:allow={}", self.lab.path("tank").display())]);
        }
        if bridge_b && !opts.dst_args.iter().any(|a| a.starts_with("lxc:bridge=")) {
            opts.dst_args.extend(["--htype-opt".into(), format!("lxc:bridge={BRIDGE_B}")]);
        }
        self.lab.migrate(0, opts).expect("migration ran")
    }

    fn counter(&self, path: &Path, name: &str) -> Option<u64> {
        self.lxc.counter(path, name)
    }

    /// Starts the container on A with a client connected to its echo server; the client and A's counter.
    fn start_with_client(&self, name: &str) -> (TcpStream, u64) {
        self.lxc.start_a(name).expect("started on A");
        let mut client = connect_client(&self.lab);
        assert_eq!(echo(&mut client, "before"), "before");
        (client, self.counter(&self.lxc.path_a, name).expect("counter on A"))
    }

    /// After `run`: the container is RUNNING on B, its counter went on from `before`, `client`'s connection works.
    fn assert_goes_on_on_b(&self, name: &str, run: &MigrationRun, client: &mut TcpStream, before: u64) {
        assert_eq!(self.lxc.state(&self.lxc.path_b, name).as_deref(), Some("RUNNING"), "{}", run.describe());
        std::thread::sleep(Duration::from_millis(600));
        let after = self.counter(&self.lxc.path_b, name).expect("counter on B");
        assert!(after > before, "the counter went on on B ({before} -> {after})");
        assert_eq!(echo(client, "after"), "after");
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
    b.lxc.create_busybox(&name, &["lxc.cgroup.memory.limit_in_bytes = 96M"]).expect("container");
    let old_pid = b.lxc.start_a(&name).expect("started on A");
    // A limit set at run time, beside the one in the configuration.
    b.lxc.cgroup(&b.lxc.path_a, &name, "pids.max", Some("77")).expect("lxc-cgroup pids.max on A");
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

    // The console (carried as an external tty; B's liblxc made its new pty, whose master B's monitor holds):
    // lxc-console on B reaches the shell busybox's init keeps on it.
    let seen = console_session(&b.lxc, &b.lxc.path_b, &name, &["", "echo $((6*7))z"]);
    assert!(seen.contains("42z"), "lxc-console on B reached the container's console shell:\n{seen}");

    // A's container is stopped, kept, and cannot be started by mistake.
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    let cfg_a = std::fs::read_to_string(b.lxc.path_a.join(&name).join("config")).expect("A's config kept");
    assert!(cfg_a.contains("lxc.start.auto = 0"), "{cfg_a}");
    assert!(b.lxc.path_a.join(&name).join("rootfs/bin/busybox").exists(), "A's rootfs kept");
    let pa = b.lxc.path_a.display().to_string();
    match phaul_testbed::run_command(
        &mut b.lxc.command(false, "lxc-start", ["-P", &pa, "-n", &name, "-F"]),
        phaul_testbed::COMMAND_TIMEOUT,
    ) {
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
    eprintln!(
        "lxc busybox migration: total {} ms, frozen {} ms, downtime {} ms, restore {} ms",
        report["total_ms"], report["frozen_ms"], report["downtime_ms"], report["restore_ms"]
    );
    assert_eq!(report["htype"], "lxc", "{report}");
    assert_eq!(report["fs_driver"], "rsync", "{report}");
    let d = &report["htype_details"];
    assert!(d["container"].as_str().is_some_and(|c| c.starts_with(&name)), "{report}");
    assert!(d["console"].as_str().is_some_and(|c| c.starts_with("tty[") && c.contains("external tty")), "{report}");
    assert!(d["left here"].as_str().is_some_and(|c| c.contains("lxc.start.auto = 0")), "{report}");

    // Cgroup limits hold on B: the configuration's and the one set at run time.
    let mem = b.lxc.cgroup(&b.lxc.path_b, &name, "memory.limit_in_bytes", None).expect("lxc-cgroup on B");
    assert_eq!(mem, (96u64 << 20).to_string(), "memory limit on B");
    assert_eq!(b.lxc.cgroup(&b.lxc.path_b, &name, "pids.max", None).expect("lxc-cgroup on B"), "77");

    // lxc-stop on B stops it cleanly.
    assert!(b.lxc.stop(&b.lxc.path_b, &name, &["-t", "20"]), "lxc-stop on B");
    assert_eq!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("STOPPED"));
}

/// What a failed migration must leave: the container running on A under LXC (its counter going on), nothing of
/// it on B.
fn assert_on_a_only(b: &Bed, name: &str, run: &MigrationRun) {
    assert!(!run.src_status.success(), "the migration should have failed:\n{}", run.describe());
    assert_eq!(b.lxc.state(&b.lxc.path_a, name).as_deref(), Some("RUNNING"), "{}", run.describe());
    let c1 = b.counter(&b.lxc.path_a, name).expect("counter on A");
    std::thread::sleep(Duration::from_millis(700));
    let c2 = b.counter(&b.lxc.path_a, name).expect("counter on A");
    assert!(c2 > c1, "the container runs on A ({c1} -> {c2}):\n{}", run.describe());
    let left = b.lxc.path_b.join(name);
    let listing: Vec<String> = std::fs::read_dir(&left)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.exists(), "B keeps nothing of it, yet has {listing:?}:\n{}", run.describe());
    assert_ne!(b.lxc.state(&b.lxc.path_b, name).as_deref(), Some("RUNNING"));
}

#[test]
fn a_destination_without_the_containers_bridge_refuses_and_the_container_runs_on_a() {
    let Some(mut b) = bed("lxc-nobr") else { return };
    let name = LxcHosts::unique_name("nb");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    // Named on the command line: refused at the session's set-up, before anything is frozen.
    let mut opts = MigrateOptions::default();
    opts.dst_args.extend(["--htype-opt".into(), "lxc:bridge=nosuchbr".into()]);
    let run = b.migrate(&name, opts);
    assert!(run.src_stderr.contains("no bridge nosuchbr"), "{}", run.describe());
    assert_on_a_only(&b, &name, &run);
    // From the configuration (brA, which B lacks): refused once the configuration arrived; the frozen
    // container resumes on A.
    let run = b.migrate_with_config_bridge(&name, MigrateOptions::default());
    assert!(run.src_stderr.contains("lxc.net.0.link = brA"), "{}", run.describe());
    assert_on_a_only(&b, &name, &run);
}

#[test]
fn a_destination_that_has_a_container_of_that_name_refuses_it() {
    let Some(mut b) = bed("lxc-dup") else { return };
    let name = LxcHosts::unique_name("dup");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    let theirs = b.lxc.path_b.join(&name);
    std::fs::create_dir_all(&theirs).expect("B's container dir");
    std::fs::write(theirs.join("config"), "lxc.uts.name = theirs\n").expect("B's config");
    let run = b.migrate(&name, MigrateOptions::default());
    assert!(run.src_stderr.contains("already has a container named"), "{}", run.describe());
    assert!(!run.src_status.success());
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("RUNNING"));
    assert_eq!(std::fs::read_to_string(theirs.join("config")).expect("kept"), "lxc.uts.name = theirs\n");
}

#[test]
fn a_restore_that_fails_on_b_leaves_the_container_running_on_a() {
    let Some(mut b) = bed("lxc-rstfail") else { return };
    let name = LxcHosts::unique_name("rf");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    // CRIU's default mount engine fails on this machine's kernel ("Failed to move_mount"): a real restore failure.
    let mut opts = MigrateOptions::default();
    opts.dst_args.extend(["--htype-opt".into(), "lxc:mntns-compat-mode=no".into()]);
    let run = b.migrate(&name, opts);
    assert!(run.src_stderr.contains("lxc-checkpoint -r"), "the error names liblxc's restore:\n{}", run.describe());
    assert_on_a_only(&b, &name, &run);
}

#[test]
fn a_destination_killed_while_liblxc_holds_the_restore_leaves_it_on_a_and_the_next_run_succeeds() {
    let Some(mut b) = bed("lxc-kill") else { return };
    let name = LxcHosts::unique_name("kd");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    let mut opts = MigrateOptions::default();
    let file = b.lab.path("fault.json");
    phaul_testbed::fault::kill_at(&mut opts, "dst:notify:post-restore", phaul_testbed::fault::Side::Dst, file.clone());
    let run = b.migrate(&name, opts);
    assert!(file.exists(), "dst:notify:post-restore was never reached:\n{}", run.describe());
    assert!(!run.src_status.success(), "{}", run.describe());
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("RUNNING"), "{}", run.describe());
    // CRIU's action script got no answer: it failed the restore and killed what it restored.
    phaul_testbed::fault::wait_until(Duration::from_secs(15), || {
        b.lxc.state(&b.lxc.path_b, &name).as_deref() != Some("RUNNING")
    });
    assert_ne!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("RUNNING"));
    // The killed destination left its claim and configuration behind ...
    assert!(b.lxc.path_b.join(&name).join(".phaul-receiving").exists(), "the claim of the killed serve is left");
    assert!(b.lxc.path_b.join(&name).join("config").exists(), "its configuration is left");
    // ... which do not block the next run: set aside, not deleted.
    let run = b.migrate(&name, MigrateOptions::default());
    ok(&run);
    assert_eq!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("RUNNING"));
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    assert!(!b.lxc.path_b.join(&name).join(".phaul-receiving").exists(), "committed: the claim is released");
    let aside = std::fs::read_dir(b.lxc.path_b.join(&name))
        .expect("B's dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("config.phaul-leftover-"));
    assert!(aside, "the killed run's configuration was set aside");
}

#[test]
fn restart_mode_stops_the_container_on_a_and_starts_it_on_b() {
    let Some(mut b) = bed("lxc-restart") else { return };
    let name = LxcHosts::unique_name("rs");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    let mut opts = MigrateOptions::default();
    opts.src_args.extend(["--mode".into(), "restart".into()]);
    let run = b.migrate(&name, opts);
    ok(&run);
    let report = run.report.as_ref().expect("report");
    assert_eq!(report["mode"], "restart", "{report}");
    assert!(report["outage_ms"].as_f64().is_some_and(|o| o > 0.0), "the outage is reported: {report}");
    assert_eq!(b.lxc.state(&b.lxc.path_b, &name).as_deref(), Some("RUNNING"));
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    // Started afresh on B: its counter starts again from 1 and runs.
    let runs = phaul_testbed::fault::wait_until(Duration::from_secs(10), || {
        b.counter(&b.lxc.path_b, &name).is_some_and(|n| n >= 3)
    });
    assert!(runs, "the counter runs on B");
    let ps = b.lxc.attach(&b.lxc.path_b, &name, &["ps"]).expect("lxc-attach on B");
    assert!(ps.contains("nc -ll"), "{ps}");
    let cfg_a = std::fs::read_to_string(b.lxc.path_a.join(&name).join("config")).expect("A's config kept");
    assert!(cfg_a.contains("lxc.start.auto = 0") && cfg_a.contains("phaul-migrated-away"), "{cfg_a}");
    assert!(b.lxc.stop(&b.lxc.path_b, &name, &["-t", "20"]));
}

/// Types `lines` into `lxc-console -t 0` (under `script`, which gives it a terminal), then leaves it (Ctrl-a q);
/// what the terminal showed.
fn console_session(lxc: &LxcHosts, path: &Path, name: &str, lines: &[&str]) -> String {
    use std::process::Stdio;
    let cmd = format!("lxc-console -P {} -n {name} -t 0", path.display());
    let mut child = lxc
        .command(path == lxc.path_b, "script", ["-qfec", cmd.as_str(), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script lxc-console");
    let mut stdin = child.stdin.take().expect("stdin");
    let out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut { out }, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    std::thread::sleep(Duration::from_millis(800));
    for l in lines {
        let _ = stdin.write_all(format!("{l}\r").as_bytes());
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_millis(800));
    }
    let _ = stdin.write_all(b"\x01q");
    let _ = stdin.flush();
    let done = phaul_testbed::fault::wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten().is_some());
    if !done {
        let _ = child.kill();
    }
    let _ = child.wait();
    drop(stdin);
    reader.join().unwrap_or_default()
}

#[test]
fn configuration_keys_that_act_on_the_destination_host_are_refused() {
    let Some(mut b) = bed("lxc-trust") else { return };
    let name = LxcHosts::unique_name("tr");
    b.lxc.create_busybox(&name, &["lxc.hook.start-host = /bin/true"]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    // The source refuses before freezing, naming the key.
    let run = b.migrate(&name, MigrateOptions::default());
    assert!(run.src_stderr.contains("lxc.hook.start-host = /bin/true"), "{}", run.describe());
    assert!(
        run.report.as_ref().is_some_and(|r| r["frozen_ms"].is_null()),
        "refused before freezing:\n{}",
        run.describe()
    );
    assert_on_a_only(&b, &name, &run);
    // A source told to go ahead (trust-config=yes) meets a destination that does not trust it: refused there,
    // the container resumes on A. The source's own trust-config=yes is not the destination's.
    let mut opts = MigrateOptions::default();
    opts.src_args.extend(["--htype-opt".into(), "trust-config=yes".into()]);
    let run = b.migrate(&name, opts);
    assert!(run.src_stderr.contains("not taken from a source"), "{}", run.describe());
    assert_on_a_only(&b, &name, &run);
}

/// The Debian container with systemd as its init: phaul refuses it before freezing, with the exact reason
/// (systemd's credential mounts are ramfs, which CRIU cannot dump), and it goes on running on A.
#[test]
fn a_systemd_container_is_refused_before_freezing_with_the_reason() {
    let Some(mut b) = bed("lxc-systemd") else { return };
    let name = LxcHosts::unique_name("sd");
    b.lxc.create_debian(&name).expect("lxc-create -t debian");
    b.lxc.start_a_plain(&name).expect("started on A");
    // Wait for systemd to have started its units (their credential mounts).
    let cred = b.lxc.path_a.join(&name);
    let booted = phaul_testbed::fault::wait_until(Duration::from_secs(60), || {
        b.lxc
            .init_pid(&b.lxc.path_a, &name)
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/mountinfo")).ok())
            .is_some_and(|m| m.contains("/run/credentials/"))
    });
    assert!(booted, "systemd in {} made its credential mounts", cred.display());
    let run = b.migrate(&name, MigrateOptions::default());
    assert!(!run.src_status.success(), "{}", run.describe());
    assert!(
        run.src_stderr.contains("ramfs mounted at /run/credentials/")
            && run.src_stderr.contains("CRIU cannot dump ramfs"),
        "the reason is named:\n{}",
        run.describe()
    );
    assert!(
        run.report.as_ref().is_some_and(|r| r["frozen_ms"].is_null()),
        "refused before freezing:\n{}",
        run.describe()
    );
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("RUNNING"));
    assert!(!b.lxc.path_b.join(&name).exists(), "B keeps nothing of it");
}

/// The subvolumes on a host's btrfs (paths from its top).
fn subvolumes(fs: &LoopBtrfs) -> Vec<String> {
    fs.subvolumes().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_container_on_lxcs_btrfs_backing_store_moves_by_the_btrfs_driver() {
    let Some(mut b) = btrfs_bed("lxc-btrfs") else { return };
    let name = LxcHosts::unique_name("bt");
    b.lxc.create_busybox_on(&name, &[], &["-B", "btrfs"]).expect("container on btrfs");
    let rootfs = format!("lxc/{name}/rootfs");
    assert_eq!(subvolumes(&b._btrfs[0]), vec![rootfs.clone()], "lxc-create -B btrfs made a subvolume");
    let cfg_a = std::fs::read_to_string(b.lxc.path_a.join(&name).join("config")).expect("A's config");
    assert!(cfg_a.contains("lxc.rootfs.path = btrfs:"), "{cfg_a}");
    let (mut client, before) = b.start_with_client(&name);

    let run = b.migrate(&name, MigrateOptions::default());
    ok(&run);
    let report = run.report.as_ref().expect("report");
    assert_eq!(report["fs_driver"], "btrfs", "{report}");
    assert!(report["htype_details"]["rootfs"].as_str().is_some_and(|r| r.starts_with("btrfs:")), "{report}");

    // B: LXC runs it on a subvolume of B's own btrfs, its config says so, and the counter goes on there.
    b.assert_goes_on_on_b(&name, &run, &mut client, before);
    assert_eq!(subvolumes(&b._btrfs[1]), vec![rootfs.clone()], "B has the root subvolume and no snapshot");
    let cfg_b = std::fs::read_to_string(b.lxc.path_b.join(&name).join("config")).expect("B's config");
    let want = format!("lxc.rootfs.path = btrfs:{}", b.lxc.path_b.join(&name).join("rootfs").display());
    assert!(cfg_b.contains(&want), "{cfg_b}");
    let touched = b.lxc.attach(&b.lxc.path_b, &name, &["sh", "-c", "echo b > /written-on-b && cat /written-on-b"]);
    assert_eq!(touched.expect("lxc-attach on B").trim(), "b", "B's root subvolume is writable");

    // A: stopped, its subvolume kept (no snapshot left beside it) and untouched by B's writes.
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    assert_eq!(subvolumes(&b._btrfs[0]), vec![rootfs], "A keeps its subvolume and no snapshot");
    assert!(!b.lxc.path_a.join(&name).join("rootfs/written-on-b").exists());
    assert!(b.lxc.stop(&b.lxc.path_b, &name, &["-t", "20"]), "lxc-stop on B");
}

#[test]
fn a_restore_that_fails_on_b_leaves_no_subvolume_on_bs_btrfs() {
    let Some(mut b) = btrfs_bed("lxc-btrfs-fail") else { return };
    let name = LxcHosts::unique_name("bf");
    b.lxc.create_busybox_on(&name, &[], &["-B", "btrfs"]).expect("container on btrfs");
    b.lxc.start_a(&name).expect("started on A");
    let mut opts = MigrateOptions::default();
    opts.dst_args.extend(["--htype-opt".into(), "lxc:mntns-compat-mode=no".into()]);
    let run = b.migrate(&name, opts);
    assert_on_a_only(&b, &name, &run);
    assert_eq!(subvolumes(&b._btrfs[1]), Vec::<String>::new(), "B's btrfs keeps nothing:\n{}", run.describe());
    assert_eq!(subvolumes(&b._btrfs[0]), vec![format!("lxc/{name}/rootfs")], "A keeps only its subvolume");
}

/// `phaul images` on a host: its JSON list.
fn images_json(b: &Bed, img: &str, state: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let (img, state) = (b.lab.path(img).display().to_string(), b.lab.path(state).display().to_string());
    let mut args = vec!["--state-dir", state.as_str(), "images"];
    args.extend_from_slice(extra);
    args.extend(["--img-path", img.as_str(), "--json"]);
    let out = std::process::Command::new(&b.lab.phaul).args(&args).output().expect("phaul images");
    assert!(out.status.success(), "phaul images {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    match v {
        serde_json::Value::Array(a) => a,
        other => other["removed"].as_array().cloned().unwrap_or_default(),
    }
}

/// Failed migrations keep their images; `serve --keep-failed N` caps them on the destination, and `phaul
/// images` lists and prunes them on either host.
#[test]
fn failed_migrations_keep_their_images_until_pruned_and_keep_failed_caps_them() {
    let Some(mut b) = bed("lxc-keep") else { return };
    let name = LxcHosts::unique_name("kf");
    b.lxc.create_busybox(&name, &[]).expect("container");
    b.lxc.start_a(&name).expect("started on A");
    for _ in 0..3 {
        // A real restore failure on B (CRIU's default mount engine), so that both sides keep their images.
        let mut opts = MigrateOptions::default();
        opts.dst_args.extend(["--htype-opt".into(), "lxc:mntns-compat-mode=no".into()]);
        opts.dst_args.extend(["--keep-failed".into(), "1".into()]);
        let run = b.migrate(&name, opts);
        assert_on_a_only(&b, &name, &run);
    }
    let dst = images_json(&b, "dst-images", "dst-state", &[]);
    let dst_sets: Vec<_> = dst.iter().filter(|s| s["side"] == "destination").collect();
    assert_eq!(dst_sets.len(), 1, "--keep-failed 1 left the newest failed set on B: {dst:?}");
    assert_eq!(dst_sets[0]["outcome"], "aborted", "{dst:?}");
    let src = images_json(&b, "src-images", "src-state", &[]);
    assert_eq!(src.len(), 3, "A keeps each failed migration's images: {src:?}");
    assert!(src.iter().all(|s| s["outcome"] == "rolled-back" && s["bytes"].as_u64() > Some(0)), "{src:?}");
    let removed = images_json(&b, "src-images", "src-state", &["prune", "--keep-failed", "2"]);
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(images_json(&b, "src-images", "src-state", &[]).len(), 2);
    // The container still runs on A throughout.
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("RUNNING"));
}

#[test]
fn a_container_whose_root_is_a_zfs_dataset_moves_by_the_zfs_driver() {
    let Some(mut b) = zfs_bed("lxc-zfs") else { return };
    let name = LxcHosts::unique_name("zf");
    let mnt = b.lab.path("tank");
    let ds = format!("tank/{name}");
    b.zfs[0].zfs(&["create", &ds]).expect("A's dataset");
    let root = mnt.join(&name).display().to_string();
    b.lxc.create_busybox_on(&name, &[], &["-B", "dir", "--dir", &root]).expect("container on a dataset");
    let (mut client, before) = b.start_with_client(&name);

    let run = b.migrate(&name, MigrateOptions::default());
    ok(&run);
    assert_eq!(run.report.as_ref().map(|r| r["fs_driver"].clone()), Some(serde_json::Value::from("zfs")));
    b.assert_goes_on_on_b(&name, &run, &mut client, before);
    assert!(b.zfs[1].all().expect("B's datasets").contains(&ds), "B received the dataset");
    assert_eq!(b.lxc.state(&b.lxc.path_a, &name).as_deref(), Some("STOPPED"));
    assert!(b.zfs[0].all().expect("A's datasets").contains(&ds), "A keeps its dataset");
    assert!(b.lxc.stop(&b.lxc.path_b, &name, &["-t", "20"]), "lxc-stop on B");
}
