//! Real LXC containers on two "hosts" of one machine: each host has its own LXC path and, in its network namespace,
//! its own bridge (`brA`, `brB`); a veth pair joins the two bridges into one layer-2 segment, as two machines on
//! one network would be, so that a client on A still reaches the container's address once it runs behind B's
//! bridge. A's bridge has the client's address ([`LXC_CLIENT_ADDR`]).
//!
//! Each host also has a mount namespace of its own with its own sysfs, as a machine has: LXC reads
//! `/sys/class/net/BRIDGE/bridge`, and sysfs shows the network devices of the namespace that mounted it. A holder
//! process keeps each mount namespace; LXC's tools, and phaul through [`LxcHosts::wrapper`], run in them.
//!
//! Containers are made with LXC's own busybox template (`lxc-create -t busybox`, offline) and started in host A's
//! network namespace, so their veth joins A's bridge. Their services start from their own init (rcS), as a real
//! container's would: a counter writing `/counter` five times a second and a TCP echo server on
//! [`LXC_ECHO_PORT`]. Dropping [`LxcHosts`] kills the containers it made (on both LXC paths) and removes the
//! bridges' link.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run_command, Host, HostPair, TestbedError, COMMAND_TIMEOUT};

/// The container's address, on both bridges' segment.
pub const LXC_CT_ADDR: &str = "10.77.0.2";
/// The client's address, on A's bridge.
pub const LXC_CLIENT_ADDR: &str = "10.77.0.1";
/// The container's echo server.
pub const LXC_ECHO_PORT: u16 = 7000;
/// The container's MAC address.
pub const LXC_CT_MAC: &str = "00:16:3e:77:00:02";
pub const BRIDGE_A: &str = "brA";
pub const BRIDGE_B: &str = "brB";

/// Whether LXC's tools and the busybox template are installed.
pub fn lxc_available() -> bool {
    Path::new("/usr/bin/lxc-create").exists() && Path::new("/usr/share/lxc/templates/lxc-busybox").exists()
}

/// Runs a command with no output kept, bounded: for `lxc-start`, whose monitor inherits its descriptors.
fn run_detached(cmd: &mut Command, timeout: Duration) -> Result<bool, TestbedError> {
    let what = crate::describe_command(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| TestbedError::Spawn { command: what.clone(), source })?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok(s.success()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestbedError::Timeout { what, timeout });
            }
            Err(e) => return Err(TestbedError::io(format!("waiting for `{what}`"), e)),
        }
    }
}

/// Run in a host's new mount namespace: a sysfs mounted there shows this network namespace's devices; its two
/// network directories are bound over the machine's (the rest of /sys, cgroups included, stays).
pub const SYSFS_NET_MOUNTS: &str = "d=$(mktemp -d) || exit 97; mount -t sysfs sysfs \"$d\" || exit 97; \
     mount --bind \"$d/class/net\" /sys/class/net && mount --bind \"$d/devices/virtual/net\" /sys/devices/virtual/net \
     || exit 97; umount -l \"$d\"; rmdir \"$d\"; ";

/// A process holding a host's mount namespace (with the host's own sysfs): one this started, or one that
/// already holds such a namespace (a host's zfs-fuse daemon, [`crate::storage::ZfsHost::new_in`]).
#[derive(Debug)]
struct Holder(Option<std::process::Child>, u32);

impl Holder {
    fn id(&self) -> u32 {
        self.1
    }

    fn start(host: &Host) -> Result<Holder, TestbedError> {
        let script = format!("{SYSFS_NET_MOUNTS}exec sleep 86400");
        let child = host
            .command("unshare", ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestbedError::io("starting a mount-namespace holder", e))?;
        let pid = child.id();
        let h = Holder(Some(child), pid);
        // Ready once sh has exec'd sleep (its mount namespace then differs from ours and sysfs is remounted).
        let deadline = Instant::now() + Duration::from_secs(10);
        let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            if comm.trim() == "sleep" && theirs != ours {
                return Ok(h);
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Timeout {
                    what: "a mount-namespace holder".into(),
                    timeout: Duration::from_secs(10),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `path` as the process `holder` sees it (through its root, which is its mount namespace's).
fn host_view(holder: u32, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{holder}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

/// Two LXC paths, two bridges joined into one segment, and the containers a test made.
#[derive(Debug)]
pub struct LxcHosts {
    a: Host,
    b: Host,
    holder_a: Holder,
    holder_b: Holder,
    pub path_a: PathBuf,
    pub path_b: PathBuf,
    made: Vec<String>,
}

impl LxcHosts {
    /// Sets up bridges in both hosts of `pair` and LXC paths `ROOT/lxc-a` and `ROOT/lxc-b`.
    pub fn new(pair: &HostPair, root: &Path) -> Result<LxcHosts, TestbedError> {
        LxcHosts::new_at(pair, &root.join("lxc-a"), &root.join("lxc-b"))
    }

    /// As [`LxcHosts::new`] with the LXC paths given (created if missing): e.g. on a host's own btrfs, mounted
    /// before this call so that the hosts' mount namespaces have it.
    pub fn new_at(pair: &HostPair, path_a: &Path, path_b: &Path) -> Result<LxcHosts, TestbedError> {
        LxcHosts::new_with(pair, path_a, path_b, None)
    }

    /// As [`LxcHosts::new_at`] in mount namespaces other processes hold (`(A's, B's)` pids; each must have
    /// mounted its host's sysfs network directories, [`SYSFS_NET_MOUNTS`]).
    pub fn new_in(
        pair: &HostPair,
        path_a: &Path,
        path_b: &Path,
        holders: (u32, u32),
    ) -> Result<LxcHosts, TestbedError> {
        LxcHosts::new_with(pair, path_a, path_b, Some(holders))
    }

    fn new_with(
        pair: &HostPair,
        path_a: &Path,
        path_b: &Path,
        holders: Option<(u32, u32)>,
    ) -> Result<LxcHosts, TestbedError> {
        let (a, b) = (pair.a().clone(), pair.b().clone());
        let ip = |h: &Host, args: &[&str]| -> Result<(), TestbedError> {
            let mut all = vec!["-n", h.name()];
            all.extend_from_slice(args);
            run_command(Command::new("ip").args(&all), COMMAND_TIMEOUT).map(|_| ())
        };
        ip(&a, &["link", "add", BRIDGE_A, "type", "bridge"])?;
        ip(&b, &["link", "add", BRIDGE_B, "type", "bridge"])?;
        // The segment's link: one end on each bridge.
        ip(&a, &["link", "add", "seg-a", "type", "veth", "peer", "name", "seg-b", "netns", b.name()])?;
        ip(&a, &["link", "set", "seg-a", "master", BRIDGE_A, "up"])?;
        ip(&b, &["link", "set", "seg-b", "master", BRIDGE_B, "up"])?;
        ip(&a, &["addr", "add", &format!("{LXC_CLIENT_ADDR}/24"), "dev", BRIDGE_A])?;
        ip(&a, &["link", "set", BRIDGE_A, "up"])?;
        ip(&b, &["link", "set", BRIDGE_B, "up"])?;
        let (path_a, path_b) = (path_a.to_path_buf(), path_b.to_path_buf());
        let (holder_a, holder_b) = match holders {
            Some((pa, pb)) => (Holder(None, pa), Holder(None, pb)),
            None => (Holder::start(&a)?, Holder::start(&b)?),
        };
        for (p, h) in [(&path_a, &holder_a), (&path_b, &holder_b)] {
            let seen = host_view(h.id(), p);
            std::fs::create_dir_all(&seen).map_err(|e| TestbedError::io(format!("creating {}", p.display()), e))?;
        }
        Ok(LxcHosts { a, b, holder_a, holder_b, path_a, path_b, made: Vec::new() })
    }

    /// `path` as host A (`b == false`) or B sees it, readable from the test's own mount namespace.
    pub fn view(&self, b: bool, path: &Path) -> PathBuf {
        host_view(if b { self.holder_b.id() } else { self.holder_a.id() }, path)
    }

    /// A container's file as the host of its LXC path sees it.
    pub fn file(&self, lxcpath: &Path, name: &str, rel: &str) -> PathBuf {
        self.view(self.on_b(lxcpath), &lxcpath.join(name).join(rel))
    }

    /// The container's root filesystem (its configuration's `lxc.rootfs.path`), as its host sees it.
    pub fn rootfs(&self, lxcpath: &Path, name: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.file(lxcpath, name, "config")).ok()?;
        let v = text.lines().find_map(|l| l.strip_prefix("lxc.rootfs.path = "))?;
        let p = v.split_once(':').map(|(_, p)| p).unwrap_or(v).trim();
        Some(self.view(self.on_b(lxcpath), Path::new(p)))
    }

    /// The number in the container's `/counter`.
    pub fn counter(&self, lxcpath: &Path, name: &str) -> Option<u64> {
        read_counter(&self.rootfs(lxcpath, name)?.join("counter"))
    }

    /// A command in host A's (`b == false`) or B's network and mount namespaces.
    pub fn command<I, S>(&self, b: bool, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let (host, holder) = if b { (&self.b, &self.holder_b) } else { (&self.a, &self.holder_a) };
        let pid = holder.id().to_string();
        let mut all: Vec<std::ffi::OsString> =
            vec!["--mount".into(), "--target".into(), pid.into(), "--".into(), program.into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        host.command("nsenter", all)
    }

    /// The wrapper that runs phaul in host A's (`b == false`) or B's mount namespace
    /// ([`crate::MigrateOptions::src_wrapper`]; the network namespace is the host's already).
    pub fn wrapper(&self, b: bool) -> (PathBuf, Vec<String>) {
        let holder = if b { &self.holder_b } else { &self.holder_a };
        (PathBuf::from("/usr/bin/nsenter"), vec!["--mount".into(), "--target".into(), holder.id().to_string()])
    }

    /// A fresh container name (cgroup names are global to the kernel, so unique per test).
    pub fn unique_name(tag: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{tag}{}x{n}", std::process::id())
    }

    /// Creates a busybox container `name` in A's LXC path with `extra` configuration lines (which win over the
    /// template's), its services in its rcS; not started.
    pub fn create_busybox(&mut self, name: &str, extra: &[&str]) -> Result<PathBuf, TestbedError> {
        self.create_busybox_on(name, extra, &[])
    }

    /// As [`LxcHosts::create_busybox`] with `lxc-create` options for the backing store (`["-B", "btrfs"]`).
    pub fn create_busybox_on(&mut self, name: &str, extra: &[&str], store: &[&str]) -> Result<PathBuf, TestbedError> {
        let conf = self.path_a.join(format!("{name}.create.conf"));
        let base = format!(
            "lxc.net.0.type = veth\nlxc.net.0.link = {BRIDGE_A}\nlxc.net.0.flags = up\nlxc.net.0.name = eth0\nlxc.net.0.hwaddr = {LXC_CT_MAC}\nlxc.net.0.ipv4.address = {LXC_CT_ADDR}/24\n"
        );
        std::fs::write(self.view(false, &conf), base)
            .map_err(|e| TestbedError::io("writing the container's create config", e))?;
        let pa = self.path_a.display().to_string();
        let mut args: Vec<String> = ["-P", pa.as_str(), "-n", name].iter().map(|s| s.to_string()).collect();
        args.extend(store.iter().map(|s| s.to_string()));
        args.extend(["-t".into(), "busybox".into(), "-f".into(), conf.display().to_string()]);
        let out = run_command(&mut self.command(false, "lxc-create", &args), Duration::from_secs(120))?;
        let _ = std::fs::remove_file(self.view(false, &conf));
        if !out.status.success() {
            return Err(TestbedError::InvalidArgument(format!(
                "lxc-create -t busybox failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        self.made.push(name.to_string());
        let dir = self.path_a.join(name);
        let cfg = self.view(false, &dir.join("config"));
        let mut text = std::fs::read_to_string(&cfg).map_err(|e| TestbedError::io("reading the config", e))?;
        let rootfs = text
            .lines()
            .find_map(|l| l.strip_prefix("lxc.rootfs.path = "))
            .map(|v| v.split_once(':').map(|(_, p)| p).unwrap_or(v).trim().to_string())
            .ok_or_else(|| TestbedError::InvalidArgument(format!("{name}'s config names no lxc.rootfs.path")))?;
        let rootfs = self.view(false, Path::new(&rootfs));
        // Services from the container's own init; no DHCP (the address is static), no getty on a tty.
        let rcs = format!(
            "#!/bin/sh\n/bin/mount -a\n(i=0; while true; do i=$((i+1)); echo $i > /counter; sleep 0.2; done) </dev/null >/dev/null 2>&1 &\n/bin/nc -ll -p {LXC_ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &\n"
        );
        let inittab = "::sysinit:/etc/init.d/rcS\nconsole::askfirst:/bin/sh\n";
        std::fs::write(rootfs.join("etc/init.d/rcS"), rcs).map_err(|e| TestbedError::io("writing rcS", e))?;
        std::fs::write(rootfs.join("etc/inittab"), inittab).map_err(|e| TestbedError::io("writing inittab", e))?;
        // The template's ttys cannot be carried by CRIU through liblxc: 0 unless the test says otherwise.
        text = text.replace("lxc.tty.max = 5", "lxc.tty.max = 0");
        for l in extra {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&cfg, text).map_err(|e| TestbedError::io("writing the config", e))?;
        Ok(dir)
    }

    /// Creates a Debian bookworm container with systemd as its init (`lxc-create -t debian`, which runs
    /// debootstrap against the machine's own Debian mirror; LXC caches the result), on A's bridge; not started.
    pub fn create_debian(&mut self, name: &str) -> Result<PathBuf, TestbedError> {
        let conf = self.path_a.join(format!("{name}.create.conf"));
        let base = format!(
            "lxc.net.0.type = veth\nlxc.net.0.link = {BRIDGE_A}\nlxc.net.0.flags = up\nlxc.net.0.name = eth0\nlxc.net.0.ipv4.address = {LXC_CT_ADDR}/24\n"
        );
        std::fs::write(&conf, base).map_err(|e| TestbedError::io("writing the container's create config", e))?;
        let pa = self.path_a.display().to_string();
        let out = run_command(
            Command::new("lxc-create")
                .env("MIRROR", debian_mirror())
                .args(["-P", &pa, "-n", name, "-t", "debian", "-f"])
                .arg(&conf)
                .args(["--", "-r", "bookworm"]),
            Duration::from_secs(900),
        );
        let _ = std::fs::remove_file(&conf);
        let out = out?;
        if !out.status.success() {
            return Err(TestbedError::InvalidArgument(format!(
                "lxc-create -t debian failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        self.made.push(name.to_string());
        let dir = self.path_a.join(name);
        let cfg = dir.join("config");
        let mut text = std::fs::read_to_string(&cfg).map_err(|e| TestbedError::io("reading the config", e))?;
        // This kernel has no AppArmor; the ttys cannot be carried (the console is).
        text = text.replace("lxc.apparmor.profile", "#lxc.apparmor.profile");
        text.push_str("lxc.tty.max = 0\n");
        std::fs::write(&cfg, text).map_err(|e| TestbedError::io("writing the config", e))?;
        Ok(dir)
    }

    /// Starts a container of A's LXC path in host A's network namespace and returns its init's pid once it runs.
    pub fn start_a_plain(&self, name: &str) -> Result<i32, TestbedError> {
        let pa = self.path_a.display().to_string();
        let ok = run_detached(&mut self.command(false, "lxc-start", ["-P", &pa, "-n", name]), Duration::from_secs(60))?;
        if !ok {
            return Err(TestbedError::InvalidArgument(format!("lxc-start of {name} in {pa} failed")));
        }
        self.init_pid(&self.path_a, name)
            .ok_or_else(|| TestbedError::InvalidArgument(format!("lxc-info gives no init pid for {name}")))
    }

    /// Starts a container of A's LXC path in host A's network namespace and waits until its counter runs.
    pub fn start_a(&self, name: &str) -> Result<i32, TestbedError> {
        let pa = self.path_a.display().to_string();
        let ok = run_detached(&mut self.command(false, "lxc-start", ["-P", &pa, "-n", name]), Duration::from_secs(60))?;
        if !ok {
            return Err(TestbedError::InvalidArgument(format!("lxc-start of {name} in {pa} failed")));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.counter(&self.path_a, name).is_some_and(|n| n >= 2) {
                return self
                    .init_pid(&self.path_a, name)
                    .ok_or_else(|| TestbedError::InvalidArgument(format!("lxc-info gives no init pid for {name}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestbedError::Timeout {
            what: format!("container {name}'s counter to run"),
            timeout: Duration::from_secs(30),
        })
    }

    /// Whether a container of `path` lives in host B: LXC's command socket is an abstract unix socket, which
    /// belongs to a network namespace, so its tools must run there.
    fn on_b(&self, path: &Path) -> bool {
        path == self.path_b
    }

    /// `lxc-info -s -H` (the state), or `None` when LXC does not know the container there.
    pub fn state(&self, path: &Path, name: &str) -> Option<String> {
        let p = path.display().to_string();
        let out = run_command(
            &mut self.command(self.on_b(path), "lxc-info", ["-P", &p, "-n", name, "-s", "-H"]),
            COMMAND_TIMEOUT,
        )
        .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn init_pid(&self, path: &Path, name: &str) -> Option<i32> {
        let p = path.display().to_string();
        let out = run_command(
            &mut self.command(self.on_b(path), "lxc-info", ["-P", &p, "-n", name, "-p", "-H"]),
            COMMAND_TIMEOUT,
        )
        .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// `lxc-attach -P PATH -n NAME -- ARGS`: its stdout, or an error with its stderr.
    pub fn attach(&self, path: &Path, name: &str, args: &[&str]) -> Result<String, TestbedError> {
        let p = path.display().to_string();
        let mut all = vec!["-P", p.as_str(), "-n", name, "--"];
        all.extend_from_slice(args);
        let out = run_command(&mut self.command(self.on_b(path), "lxc-attach", &all), COMMAND_TIMEOUT)?;
        if !out.status.success() {
            return Err(TestbedError::InvalidArgument(format!(
                "lxc-attach {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lxc-cgroup -P PATH -n NAME KEY [VALUE]`: the value read (or set).
    pub fn cgroup(&self, path: &Path, name: &str, key: &str, value: Option<&str>) -> Result<String, TestbedError> {
        let p = path.display().to_string();
        let mut all = vec!["-P", p.as_str(), "-n", name, key];
        all.extend(value);
        let out = run_command(&mut self.command(self.on_b(path), "lxc-cgroup", &all), COMMAND_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `lxc-stop -P PATH -n NAME ARGS`, bounded; whether it succeeded.
    pub fn stop(&self, path: &Path, name: &str, args: &[&str]) -> bool {
        let p = path.display().to_string();
        let mut all = vec!["-P", p.as_str(), "-n", name];
        all.extend_from_slice(args);
        run_detached(&mut self.command(self.on_b(path), "lxc-stop", &all), Duration::from_secs(60)).unwrap_or(false)
    }

    pub fn host_a(&self) -> &Host {
        &self.a
    }

    pub fn host_b(&self) -> &Host {
        &self.b
    }
}

/// The number in a container's `/counter`.
pub fn read_counter(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Drop for LxcHosts {
    fn drop(&mut self) {
        for name in &self.made {
            for path in [&self.path_a, &self.path_b] {
                if self.state(path, name).is_some_and(|s| s != "STOPPED") {
                    // Its init, so that it goes even when lxc-stop cannot reach the monitor.
                    let init = self.init_pid(path, name);
                    if !self.stop(path, name, &["-k"]) {
                        if let Some(p) = init.filter(|p| *p > 1) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(p),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            }
        }
        // The bridges and the segment go with the network namespaces.
    }
}

/// The Debian mirror of this machine's own apt configuration (`scripts/apt-mirror`, which scripts/setup uses too;
/// deb.debian.org when apt names none).
pub fn debian_mirror() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/apt-mirror");
    match Command::new(&script).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "http://deb.debian.org/debian".into(),
    }
}
