//! The `lxc` host type: an LXC container, named by its name in an LXC path, that LXC manages on the destination
//! afterwards as if it had been started there.
//!
//! **Source.** phaul dumps the container over CRIU's RPC with the options liblxc's own `lxc-checkpoint` uses
//! (established TCP, file locks, link-remap, cgroups carried in full, external mounts, the console as an external
//! tty, in-flight connections skipped, the container's freezer cgroup), and writes `tty.info` the way liblxc's
//! dump does, so that liblxc's restore on the destination finds what it expects. The configuration travels beside
//! the images; the root filesystem travels by the filesystem driver (`lxc.rootfs.path`, `dir:` or `btrfs:`).
//!
//! **Destination.** The configuration is rewritten for this host (LXC path, root filesystem path, bridge) and the
//! container is restored by liblxc (`lxc-checkpoint -r`), so that its monitor owns the container: `lxc-info`,
//! `lxc-attach`, `lxc-console` and `lxc-stop` work on it. liblxc runs `criu` from `PATH`: phaul puts a `criu`
//! first there that runs phaul's CRIU with what liblxc has no flag for (phaul's action script, which holds the
//! restored container until the commit; `--mntns-compat-mode`; the network lock's method).
//!
//! **After the commit** the container on the source is stopped, its configuration and root filesystem left in
//! place, with `lxc.start.auto = 0` and a pre-start hook (`phaul-migrated-away` beside the configuration) that
//! refuses to start it and says why, so that neither a reboot nor a stray `lxc-start` runs a second copy.
//!
//! Options (`--htype-opt KEY=VALUE`; on the destination `phaul serve --htype-opt lxc:KEY=VALUE`, and only the
//! destination's own values count there):
//! - `lxcpath=DIR`: the LXC path (default: LXC's own, `lxc-config lxc.lxcpath`);
//! - `bridge=NAME` (destination): the bridge every veth device is attached to (default: the one it had);
//! - `rootfs-dir=DIR` (destination, with the `shared` driver only): where the root filesystem is on this host,
//!   when it is not at the source's path;
//! - `mntns-compat-mode=yes|no` (destination, yes): CRIU's older mount engine, which this machine's kernels need;
//! - `trust-config=yes|no` (no): take every key of the container's configuration from the source. Without it a
//!   destination takes only keys that describe the container itself (see `trust.rs`) and refuses the rest by
//!   name (hooks, network scripts, bind mounts of host paths, log files, host namespaces, devices...), which
//!   liblxc would act on as root on this host; the source checks the same before freezing;
//! - `stop-timeout=SECONDS` (30): how long `lxc-stop` may take (restart mode).
//!
//! What phaul cannot carry it refuses before freezing, naming the configuration key: ttys (`lxc.tty.max` above
//! 0: their pty masters are LXC's monitor's, and liblxc's restore recreates only the console), network devices
//! other than veth, empty and none, root filesystems on other backing stores, nested containers.

mod config;
mod tools;
mod trust;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phaul_abi::{
    option, own_options, CgroupMode, CriuOptions, CriuStage, ExtraFile, HostType, HostTypeArgs, KeyValue, Mode,
    NetworkLock, Outcome, PluginError, PluginResult, RestoreRequest, Role,
};

pub use config::{Config, Rootfs};
use tools::{tail, Tools};

const KNOWN: &[&str] = &["lxcpath", "bridge", "rootfs-dir", "mntns-compat-mode", "trust-config", "stop-timeout"];
/// The file beside a migrated-away container's configuration that refuses its start.
pub const MARKER: &str = "phaul-migrated-away";
/// The claim a destination holds on the container's directory until the commit: a file holding the pid of the
/// `phaul serve` receiving it. A second session for the name is refused while that process lives; once it is gone
/// (killed mid-migration) a later run sets aside the configuration it left, when the container does not run.
const CLAIM: &str = ".phaul-receiving";
/// The longest configuration accepted from a source.
const MAX_CONFIG: u64 = 1 << 20;
const QUICK: Duration = Duration::from_secs(30);
/// `lxc-checkpoint -r` returns once phaul's hold ends (the commit or the roll-back), which phaul bounds itself.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(1800);

struct Lxc {
    name: String,
    role: Role,
    mode: Mode,
    lxcpath: PathBuf,
    bridge: Option<String>,
    rootfs_dir: Option<String>,
    mntns_compat: bool,
    trust_config: bool,
    stop_timeout: u64,
    work: PathBuf,
    tools: Tools,
    /// Source: the container's init, once found.
    init: Option<i32>,
    /// Source: the configuration as read before the dump.
    config: Option<Config>,
    /// Source: the console's tty id, when it has one (live mode).
    console: Option<String>,
    /// How the migration ended, once told.
    outcome: Option<Outcome>,
    /// Destination: the configuration the source sent, and its console's tty id.
    received: Option<Config>,
    tty_info: Option<String>,
    /// Destination: the configuration file this run wrote (removed on a roll-back), and the directory it made.
    wrote_config: Option<PathBuf>,
    /// Destination: the container's directory existed when the session began (else a roll-back removes it).
    dir_existed: bool,
    /// Destination: the container was started or restored here.
    started_here: bool,
    /// Destination: this session holds the claim on the container's directory.
    claimed: bool,
    /// Source: how marking the container as migrated away went.
    marked: Option<Result<(), String>>,
    /// Destination: a roll-back could not remove the container's directory this session made, because the
    /// filesystem driver's files in it were not yet gone (it removes them after the host type's roll-back; a
    /// received btrfs subvolume is read-only): the directory goes when this driver object does, if empty by then.
    rmdir_when_dropped: Option<PathBuf>,
}

impl Drop for Lxc {
    fn drop(&mut self) {
        if let Some(d) = self.rmdir_when_dropped.take() {
            // The claim was kept until now, so that no other session took the directory meanwhile.
            let _ = std::fs::remove_file(self.claim_path());
            // Only an empty directory: whatever is still in it is someone's.
            if let Err(e) = std::fs::remove_dir(&d) {
                log::warn!("leaving {} ({e}): something in it is not this session's", d.display());
            }
        }
    }
}

fn yes_no(list: &[KeyValue], key: &str, default: bool) -> PluginResult<bool> {
    match option(list, key) {
        None => Ok(default),
        Some("yes" | "true" | "1" | "on") => Ok(true),
        Some("no" | "false" | "0" | "off") => Ok(false),
        Some(other) => Err(PluginError::invalid(format!("--htype-opt {key}={other}: the value must be yes or no"))),
    }
}

/// A container name LXC accepts and that is safe as one path component.
fn check_name(name: &str) -> PluginResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid(format!(
            "'{name}' is not a container name phaul accepts: use letters, digits, '-', '_' and '.', not starting with '.' or '-', at most 64 characters"
        )))
    }
}

fn default_lxcpath(tools: &Tools) -> PluginResult<PathBuf> {
    let out = tools.run("lxc-config", &["lxc.lxcpath"], QUICK, "asking LXC for its path (lxc-config lxc.lxcpath)")?;
    let p = out.stdout.trim();
    if p.is_empty() {
        return Err(PluginError::failed("lxc-config printed no LXC path; pass --htype-opt lxcpath=DIR"));
    }
    Ok(PathBuf::from(p))
}

fn new(args: &HostTypeArgs) -> PluginResult<Lxc> {
    let name = args.id.as_str().to_string();
    check_name(&name)?;
    // On the destination only this host's own options count: a source must not pick paths here.
    let own: &[KeyValue] =
        if args.role == Role::DESTINATION { own_options(&args.options, &args.more) } else { &args.options };
    if let Some(kv) = own.iter().find(|kv| !KNOWN.contains(&kv.key.as_str())) {
        return Err(PluginError::invalid(format!(
            "the lxc host type has no option '{}'; it knows {}",
            kv.key,
            KNOWN.join(", ")
        )));
    }
    let work = PathBuf::from(args.work_dir.as_str()).join("lxc");
    std::fs::create_dir_all(&work).map_err(|e| {
        PluginError::failed(format!("cannot create the lxc host type's directory {} ({e})", work.display()))
    })?;
    let tools = Tools::new(&work);
    let lxcpath = match option(own, "lxcpath") {
        Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
        Some(p) => return Err(PluginError::invalid(format!("--htype-opt lxcpath={p}: give an absolute path"))),
        None => default_lxcpath(&tools)?,
    };
    let stop_timeout = match option(own, "stop-timeout") {
        None => 30,
        Some(v) => v.parse::<u64>().ok().filter(|s| (1..=3600).contains(s)).ok_or_else(|| {
            PluginError::invalid(format!("--htype-opt stop-timeout={v}: give whole seconds, 1 to 3600"))
        })?,
    };
    let bridge = option(own, "bridge").map(str::to_string);
    if let Some(r) = option(own, "rootfs-dir").filter(|r| !Path::new(r).is_absolute()) {
        return Err(PluginError::invalid(format!("--htype-opt rootfs-dir={r}: give an absolute path")));
    }
    if let Some(b) = &bridge {
        if b.is_empty() || b.len() > 15 || !b.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(PluginError::invalid(format!("--htype-opt bridge={b}: not an interface name")));
        }
    }
    let me = Lxc {
        name,
        role: args.role,
        mode: args.mode,
        lxcpath,
        bridge,
        rootfs_dir: option(own, "rootfs-dir").map(str::to_string),
        mntns_compat: yes_no(own, "mntns-compat-mode", true)?,
        trust_config: yes_no(own, "trust-config", false)?,
        stop_timeout,
        work,
        tools,
        init: None,
        config: None,
        console: None,
        outcome: None,
        received: None,
        tty_info: None,
        wrote_config: None,
        dir_existed: true,
        started_here: false,
        claimed: false,
        marked: None,
        rmdir_when_dropped: None,
    };
    let mut me = me;
    if me.role == Role::DESTINATION {
        me.check_destination_early()?;
        // The container's directory, so that the filesystem driver can receive the root filesystem into it.
        let dir = me.dir();
        me.dir_existed = dir.exists();
        if !me.dir_existed {
            std::fs::create_dir(&dir).map_err(|e| {
                PluginError::failed(format!("cannot create the container's directory {} ({e})", dir.display()))
            })?;
        }
        me.claim()?;
    }
    Ok(me)
}

/// `ip link show NAME` in this process's network namespace (sysfs may show another one's).
fn bridge_exists(tools: &Tools, name: &str) -> PluginResult<bool> {
    let (ok, out) = tools.run_status("ip", &["-j", "-d", "link", "show", "dev", name], QUICK, "looking up a bridge")?;
    Ok(ok && out.stdout.replace(' ', "").contains("\"info_kind\":\"bridge\""))
}

/// The kernel has AppArmor (LXC and CRIU both need it for an `lxc.apparmor.profile` other than none).
fn kernel_has_apparmor() -> bool {
    Path::new("/sys/kernel/security/apparmor").exists() || Path::new("/sys/module/apparmor").exists()
}

impl Lxc {
    fn dir(&self) -> PathBuf {
        self.lxcpath.join(&self.name)
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("config")
    }

    fn lxc(&self, tool: &str, extra: &[&str], timeout: Duration, what: &str) -> PluginResult<tools::Output> {
        let p = self.lxcpath.display().to_string();
        let mut args = vec!["-P", p.as_str(), "-n", self.name.as_str()];
        args.extend_from_slice(extra);
        self.tools.run(tool, &args, timeout, what)
    }

    /// The container's state (`RUNNING`, `STOPPED`, `FROZEN`...) as `lxc-info` says.
    fn state(&self) -> PluginResult<String> {
        let out = self.lxc("lxc-info", &["-s", "-H"], QUICK, "asking lxc-info for the container's state")?;
        Ok(out.stdout.trim().to_string())
    }

    fn init_pid(&self) -> PluginResult<i32> {
        let out = self.lxc("lxc-info", &["-p", "-H"], QUICK, "asking lxc-info for the container's init pid")?;
        out.stdout.trim().parse::<i32>().ok().filter(|p| *p > 1).ok_or_else(|| {
            PluginError::not_found(format!(
                "lxc-info gave no init pid for container '{}' in {} (is it running?)",
                self.name,
                self.lxcpath.display()
            ))
        })
    }

    fn wait_state(&self, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state().is_ok_and(|s| s == want) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_config(&self) -> PluginResult<Config> {
        let p = self.config_path();
        let text = std::fs::read_to_string(&p).map_err(|e| {
            PluginError::not_found(format!(
                "no container '{}' in {}: cannot read {} ({e}); give its LXC path with --htype-opt lxcpath=DIR",
                self.name,
                self.lxcpath.display(),
                p.display()
            ))
        })?;
        Ok(Config::parse(&text))
    }

    // ---- source -------------------------------------------------------------------------------------------

    /// What the container holds that phaul cannot carry, named by its configuration key; checked before freezing.
    fn check_carriable(&self, c: &Config, init: i32) -> PluginResult<()> {
        let name = &self.name;
        if self.mode == Mode::LIVE {
            if let Some(n) = c.get("lxc.tty.max").and_then(|v| v.parse::<u32>().ok()).filter(|n| *n > 0) {
                return Err(PluginError::unsupported(format!(
                    "container '{name}' has lxc.tty.max = {n}: its ttys are ptys whose masters LXC's monitor holds outside the container, and liblxc's restore recreates only the console, so CRIU cannot carry them. Set lxc.tty.max = 0 in {} (the console, lxc.console.path, is carried) and restart the container, or use --mode restart",
                    self.config_path().display()
                )));
            }
            // Mounts CRIU cannot dump: ramfs (systemd's credential mounts, /run/credentials/UNIT, are ramfs).
            let mut seen_ns = std::collections::HashSet::new();
            for pid in std::iter::once(init).chain(self.container_pids(init)) {
                let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else { continue };
                if !seen_ns.insert(ns) {
                    continue;
                }
                let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
                if let Some(mp) = ramfs_mount(&info) {
                    let why = if mp.starts_with("/run/credentials/") {
                        " (systemd's credential mount of that unit: systemd 250 and later pass credentials to services on ramfs)"
                    } else {
                        ""
                    };
                    return Err(PluginError::unsupported(format!(
                        "container '{name}' has a ramfs mounted at {mp}{why} (pid {pid}), and CRIU cannot dump ramfs mounts, so the dump would fail. Stop what mounted it, or use --mode restart"
                    )));
                }
            }
            // A nested container: a process of this one in a pid namespace of its own.
            let own_ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).ok();
            for pid in self.container_pids(init) {
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
                if ns.is_some() && ns != own_ns {
                    return Err(PluginError::unsupported(format!(
                        "container '{name}' runs a nested container (pid {pid} is in a pid namespace of its own, as with lxc.include = {}/nesting.conf): CRIU cannot dump nested pid namespaces of a container; stop the nested container first", trust::LXC_SHARED_CONFIG
                    )));
                }
            }
        }
        let rootfs = self.source_rootfs(c)?;
        if !Path::new(&rootfs.path).is_dir() {
            return Err(PluginError::not_found(format!(
                "lxc.rootfs.path of container '{name}' names {}, which is not a directory on this host",
                rootfs.path
            )));
        }
        for i in c.net_indices() {
            let key = format!("lxc.net.{i}.type");
            match c.get(&key) {
                Some("veth" | "empty" | "none") | None => {}
                Some(other) => {
                    return Err(PluginError::unsupported(format!(
                        "container '{name}' has {key} = {other}: phaul carries veth, empty and none network devices only (liblxc's restore reattaches veth devices to a bridge)"
                    )))
                }
            }
        }
        if let Some(p) = c.get("lxc.apparmor.profile").filter(|p| !matches!(*p, "unconfined" | "generated")) {
            if !kernel_has_apparmor() {
                return Err(PluginError::unsupported(format!(
                    "container '{name}' has lxc.apparmor.profile = {p}, and this kernel has no AppArmor"
                )));
            }
        }
        Ok(())
    }

    fn source_rootfs(&self, c: &Config) -> PluginResult<Rootfs> {
        let value = c.get("lxc.rootfs.path").ok_or_else(|| {
            PluginError::invalid(format!(
                "container '{}' has no lxc.rootfs.path: it shares this host's root, which phaul cannot move",
                self.name
            ))
        })?;
        let r = Rootfs::parse(value);
        match r.kind.as_str() {
            "dir" | "btrfs" => Ok(r),
            other => Err(PluginError::unsupported(format!(
                "container '{}' has lxc.rootfs.path = {value}: the '{other}' backing store is not carried; phaul moves dir: and btrfs: root filesystems with its filesystem drivers",
                self.name
            ))),
        }
    }

    /// Every pid in the container's cgroup (the freezer's, or the unified one's), below it included.
    fn container_pids(&self, init: i32) -> Vec<i32> {
        let mut out = Vec::new();
        let Some(dir) = cgroup_dir_of(init) else { return out };
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out
    }

    /// `tty[RDEV:DEV]` of the container's /dev/console, as liblxc writes it in `tty.info`, or `None` with
    /// `lxc.console.path = none`.
    fn console_tty_id(&self, c: &Config, init: i32) -> PluginResult<Option<String>> {
        if c.get("lxc.console.path") == Some("none") {
            return Ok(None);
        }
        let p = format!("/proc/{init}/root/dev/console");
        let m = std::fs::metadata(&p).map_err(|e| {
            PluginError::failed(format!(
                "cannot stat the container's console {p} ({e}); set lxc.console.path = none if it has none"
            ))
        })?;
        Ok(Some(format!("tty[{:x}:{:x}]", m.rdev(), m.dev())))
    }

    /// The dump options, as liblxc's `lxc-checkpoint` passes them.
    fn dump_options(&self) -> PluginResult<CriuOptions> {
        let init = self.init.ok_or_else(|| PluginError::failed("the container's init is not known yet"))?;
        let c =
            self.config.as_ref().ok_or_else(|| PluginError::failed("the container's configuration was not read"))?;
        let mut o = CriuOptions {
            tcp_established: true,
            file_locks: true,
            link_remap: true,
            manage_cgroups: Some(CgroupMode::Full),
            auto_ext_mnt: true,
            ext_sharing: true,
            ext_masters: true,
            enable_fs: vec!["hugetlbfs".into(), "tracefs".into()],
            tcp_skip_in_flight: true,
            force_irmap: true,
            // liblxc's restore runs the `criu` command, whose network lock is iptables unless told: the dump
            // uses the same, and phaul's criu for liblxc says so explicitly.
            network_lock: NetworkLock::Iptables,
            ..Default::default()
        };
        for (controllers, path) in cgroup_roots(init) {
            o.cgroup_roots.push((controllers, path));
        }
        o.freeze_cgroup = freezer_of(init).map(|p| p.display().to_string());
        for entry in c.all("lxc.mount.entry") {
            let f: Vec<&str> = entry.split_whitespace().collect();
            if f.len() >= 4 && f[3].split(',').any(|o| o == "bind" || o == "rbind") {
                let dir = f[1].trim_start_matches('/');
                o.ext_mounts.push((format!("/{dir}"), dir.to_string()));
            }
        }
        if let Some(tty) = self.console_tty_id(c, init)? {
            o.ext_mounts.push(("/dev/console".into(), "console".into()));
            o.external.push(tty);
        }
        Ok(o)
    }

    fn mark_migrated_away(&self) -> PluginResult<()> {
        let marker = self.dir().join(MARKER);
        let config = self.config_path();
        let when =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let shown = |p: &Path| p.display().to_string().replace(['\n', '\r'], "?");
        let message = format!(
            "phaul: container '{}' was migrated away from this host; its copy runs on the destination. Starting it here would run a second copy; to do it anyway, remove the lxc.hook.pre-start line naming {} from {}.",
            self.name,
            shown(&marker),
            shown(&config)
        );
        let script = format!(
            "#!/bin/sh\n# Written by phaul: container '{name}' was migrated to another host (at {when}, seconds since 1970).\n# Its copy runs there; starting it here would run a second copy. To start it here anyway, delete the\n# lxc.hook.pre-start line naming this file from {config} and this file.\nprintf '%s\\n' '{quoted}' >&2\nexit 1\n",
            name = self.name,
            config = shown(&config),
            quoted = message.replace('\'', "'\\''"),
        );
        std::fs::write(&marker, script)
            .and_then(|_| std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| PluginError::failed(format!("cannot write {} ({e})", marker.display())))?;
        let mut c = self.read_config()?;
        c.set("lxc.start.auto", "0");
        let hook = marker.display().to_string();
        if !c.all("lxc.hook.pre-start").any(|h| h == hook) {
            c.push("lxc.hook.pre-start", &hook);
        }
        write_atomic(&config, &c.render())
    }

    // ---- destination --------------------------------------------------------------------------------------

    fn claim_path(&self) -> PathBuf {
        self.dir().join(CLAIM)
    }

    /// The pid in the directory's claim, if there is one.
    fn claim_holder(&self) -> Option<i32> {
        std::fs::read_to_string(self.claim_path()).ok()?.trim().parse().ok()
    }

    fn claim_is_ours(&self) -> bool {
        self.claimed && self.claim_holder() == Some(std::process::id() as i32)
    }

    /// Takes the claim on the container's directory (at set-up), or refuses while another live session holds it.
    fn claim(&mut self) -> PluginResult<()> {
        use std::io::Write;
        let p = self.claim_path();
        if let Some(pid) = self.claim_holder() {
            if Path::new(&format!("/proc/{pid}")).exists() {
                return Err(PluginError::invalid(format!(
                    "another phaul serve (pid {pid}) is receiving container '{}' into {} right now; wait for it to end",
                    self.name,
                    self.dir().display()
                )));
            }
            let _ = std::fs::remove_file(&p);
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&p).map_err(|e| {
            PluginError::failed(format!("cannot claim {} for this migration ({e})", self.dir().display()))
        })?;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(|e| PluginError::failed(format!("cannot write {} ({e})", p.display())))?;
        self.claimed = true;
        Ok(())
    }

    /// The migration committed (or restart mode's start happened): the container is this host's now.
    fn release_claim(&mut self) {
        if self.claim_is_ours() {
            if let Err(e) = std::fs::remove_file(self.claim_path()) {
                log::warn!("cannot remove {} ({e})", self.claim_path().display());
                return;
            }
        }
        self.claimed = false;
        self.wrote_config = None;
    }

    /// A configuration left by a destination that died before the commit (its claim's process is gone, and
    /// LXC says the container is STOPPED): set aside (renamed, never deleted); `true` if it was.
    fn sweep_leftover(&self) -> bool {
        let p = self.config_path();
        let Some(pid) = self.claim_holder() else { return false };
        if Path::new(&format!("/proc/{pid}")).exists() || !p.exists() {
            return false;
        }
        // An error from lxc-info is no proof that it does not run.
        if !self.state().is_ok_and(|s| s == "STOPPED") {
            return false;
        }
        let when = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let aside = self.dir().join(format!("config.phaul-leftover-{when}"));
        log::warn!(
            "{} was written by a phaul serve (pid {pid}, gone) for a migration that never committed; set aside as {}",
            p.display(),
            aside.display()
        );
        std::fs::rename(&p, &aside).is_ok()
    }

    /// Undoes this session's work here (a roll-back): the container killed if it was started, then its
    /// configuration and (if this session made it) its directory removed, only while the claim is ours. An error
    /// when the container may still run: then nothing is removed.
    fn undo_here(&mut self) -> PluginResult<()> {
        if !self.claim_is_ours() {
            return Ok(());
        }
        if self.started_here {
            self.kill_here();
            if !self.state().is_ok_and(|s| s == "STOPPED") {
                return Err(PluginError::failed(format!(
                    "container '{}' was started here and could not be seen STOPPED after lxc-stop -k; its configuration is kept in {} (stop it with lxc-stop -k -n {} -P {})",
                    self.name,
                    self.dir().display(),
                    self.name,
                    self.lxcpath.display()
                )));
            }
        }
        if let Some(p) = self.wrote_config.take() {
            let _ = std::fs::remove_file(&p);
        }
        for f in [format!("{}.log", self.name), "lxc_monitor.log".into()] {
            let _ = std::fs::remove_file(self.dir().join(f));
        }
        if !self.dir_existed {
            // This session made the container's directory: all in it (the root filesystem the driver received
            // included, which the driver would remove right after) is this session's.
            if let Err(e) = std::fs::remove_dir_all(self.dir()) {
                // What is left is the driver's (a read-only received subvolume): it removes that itself after
                // this roll-back, and the then empty directory goes when this driver object does.
                log::info!(
                    "{} is not empty yet ({e}); removed once the filesystem driver rolled back",
                    self.dir().display()
                );
                self.rmdir_when_dropped = Some(self.dir());
            }
        } else {
            let _ = std::fs::remove_file(self.claim_path());
        }
        self.claimed = false;
        Ok(())
    }

    /// At the session's set-up, before the source freezes anything.
    fn check_destination_early(&self) -> PluginResult<()> {
        if !self.lxcpath.is_dir() {
            return Err(PluginError::not_found(format!(
                "this host's LXC path {} does not exist; create it or give another with `phaul serve --htype-opt lxc:lxcpath=DIR`",
                self.lxcpath.display()
            )));
        }
        if self.config_path().exists() && !self.sweep_leftover() || self.dir().join(MARKER).exists() {
            return Err(PluginError::invalid(format!(
                "this host already has a container named '{}' in {} ({}): phaul does not overwrite it. Remove it (lxc-destroy -n {} -P {}) or give another LXC path",
                self.name,
                self.lxcpath.display(),
                self.config_path().display(),
                self.name,
                self.lxcpath.display()
            )));
        }
        if let Some(b) = &self.bridge {
            if !bridge_exists(&self.tools, b)? {
                return Err(PluginError::not_found(format!(
                    "--htype-opt lxc:bridge={b}: this host has no bridge {b}; create it (ip link add {b} type bridge) or name another"
                )));
            }
        }
        Ok(())
    }

    /// The received configuration, checked and rewritten for this host; `root` is where the root filesystem is.
    fn config_for_here(&self, root: &str) -> PluginResult<Config> {
        let mut c = self
            .received
            .clone()
            .ok_or_else(|| PluginError::failed("the source sent no container configuration (extra file 'config')"))?;
        // A source's own migrated-away marker (a return trip) is not this host's.
        c.remove_where(|k, v| k == "lxc.hook.pre-start" && v.ends_with(MARKER));
        if !self.trust_config {
            if let Some((k, v, why)) = trust::first_refused(&c) {
                return Err(PluginError::unsupported(format!(
                    "the container's configuration has {k} = {v}: {why}. liblxc would act on it as root on this host, so it is not taken from a source; remove it from the container's configuration, or pass `phaul serve --htype-opt lxc:trust-config=yes` (and --htype-opt trust-config=yes on the source) if you trust the source's configuration"
                )));
            }
        }
        let old = Rootfs::parse(c.get("lxc.rootfs.path").unwrap_or_default());
        let kind =
            if old.kind == "btrfs" && std::fs::metadata(root).is_ok_and(|m| m.ino() == 256) { "btrfs" } else { "dir" };
        c.set("lxc.rootfs.path", &format!("{kind}:{root}"));
        for i in c.net_indices() {
            if c.get(&format!("lxc.net.{i}.type")) != Some("veth") {
                continue;
            }
            let key = format!("lxc.net.{i}.link");
            let link = match (&self.bridge, c.get(&key)) {
                (Some(b), _) => b.clone(),
                (None, Some(l)) => l.to_string(),
                (None, None) => continue,
            };
            if !bridge_exists(&self.tools, &link)? {
                return Err(PluginError::not_found(format!(
                    "the container's {key} = {link}, and this host has no bridge {link}: create it (ip link add {link} type bridge), or name this host's bridge with `phaul serve --htype-opt lxc:bridge=NAME`"
                )));
            }
            c.set(&key, &link);
        }
        if let Some(p) = c.get("lxc.apparmor.profile").map(str::to_string) {
            if !kernel_has_apparmor() {
                if p == "unconfined" || p == "generated" {
                    c.comment_out("lxc.apparmor.profile", "phaul: this host's kernel has no AppArmor");
                } else {
                    return Err(PluginError::unsupported(format!(
                        "the container has lxc.apparmor.profile = {p}, and this host's kernel has no AppArmor"
                    )));
                }
            }
        }
        Ok(c)
    }

    /// Where the filesystem driver put the root filesystem on this host.
    fn root_here(&self, prepared: &[KeyValue]) -> PluginResult<String> {
        let c =
            self.received.as_ref().ok_or_else(|| PluginError::failed("the source sent no container configuration"))?;
        let src = Rootfs::parse(c.get("lxc.rootfs.path").unwrap_or_default()).path;
        let src = src.trim_end_matches('/');
        for m in phaul_abi::options(prepared, "root-map") {
            if let Some((from, to)) = m.split_once('=') {
                if from.trim_end_matches('/') == src {
                    return Ok(to.to_string());
                }
            }
        }
        if let Some(r) = option(prepared, "root") {
            return Ok(r.to_string());
        }
        // The filesystem driver said nothing (shared storage): this host's operator names the place.
        self.rootfs_dir.clone().ok_or_else(|| {
            PluginError::invalid(format!(
                "the filesystem driver did not say where the container's root filesystem ({src}) is on this host; with shared storage give it with `phaul serve --htype-opt lxc:rootfs-dir=DIR`"
            ))
        })
    }

    fn write_config_here(&mut self, prepared: &[KeyValue]) -> PluginResult<()> {
        if self.wrote_config.is_some() {
            return Ok(());
        }
        let root = self.root_here(prepared)?;
        if !Path::new(&root).is_dir() {
            return Err(PluginError::not_found(format!(
                "the container's root filesystem is not at {root} on this host; with the shared driver give its path with --htype-opt lxc:rootfs-dir=DIR"
            )));
        }
        let c = self.config_for_here(&root)?;
        self.check_destination_early()?;
        let dir = self.dir();
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .map_err(|e| PluginError::failed(format!("cannot create {} ({e})", dir.display())))?;
        }
        let path = self.config_path();
        write_atomic(&path, &c.render())?;
        self.wrote_config = Some(path);
        Ok(())
    }

    /// The `criu` liblxc runs: phaul's CRIU with phaul's action script and the settings liblxc has no flag for.
    fn criu_for_liblxc(&self, criu: &str, action_script: Option<&str>) -> PluginResult<PathBuf> {
        let bin = self.work.join("bin");
        std::fs::create_dir_all(&bin)
            .map_err(|e| PluginError::failed(format!("cannot create {} ({e})", bin.display())))?;
        let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let mut extra = String::new();
        if let Some(s) = action_script {
            extra.push_str(&format!(" --action-script {}", q(s)));
        }
        if self.mntns_compat {
            extra.push_str(" --mntns-compat-mode");
        }
        extra.push_str(" --network-lock iptables");
        let text = format!(
            "#!/bin/sh\n# Written by phaul: liblxc runs `criu` from PATH; this is phaul's CRIU, with what liblxc has no flag for.\nif [ \"$1\" = restore ]; then exec {c} \"$@\"{extra}; fi\nexec {c} \"$@\"\n",
            c = q(criu)
        );
        let path = bin.join("criu");
        std::fs::write(&path, text)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| PluginError::failed(format!("cannot write {} ({e})", path.display())))?;
        Ok(bin)
    }

    fn kill_here(&self) {
        let _ = self.lxc("lxc-stop", &["-k"], QUICK, "killing the container here");
        let _ = self.wait_state("STOPPED", QUICK);
    }
}

/// The mount point of the first ramfs in a mountinfo text.
fn ramfs_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "ramfs").then(|| left.split_whitespace().nth(4).unwrap_or("?").to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_ramfs_mounts() {
        let info = "639 600 0:50 / /run rw - tmpfs tmpfs rw\n796 639 0:186 / /run/credentials/systemd-sysctl.service ro,nosuid shared:75 - ramfs ramfs rw,mode=700\n";
        assert_eq!(super::ramfs_mount(info).as_deref(), Some("/run/credentials/systemd-sysctl.service"));
        assert_eq!(super::ramfs_mount("1 0 0:1 / / rw - ext4 /dev/x rw\n"), None);
    }
}

/// The container's cgroup roots for `--cgroup-root`: `(controllers, path)` of each v1 hierarchy its init is in
/// (on a pure cgroup2 host, the unified path).
fn cgroup_roots(init: i32) -> Vec<(Option<String>, String)> {
    let text = std::fs::read_to_string(format!("/proc/{init}/cgroup")).unwrap_or_default();
    let mut v1 = Vec::new();
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or_default(), f.next().unwrap_or_default());
        if ctrl.is_empty() {
            unified = Some(path.to_string());
        } else {
            v1.push((Some(ctrl.to_string()), path.to_string()));
        }
    }
    if v1.is_empty() {
        unified.map(|p| vec![(None, p)]).unwrap_or_default()
    } else {
        v1
    }
}

/// The freezer cgroup directory of a process (v1's freezer, else the unified hierarchy on a pure cgroup2 host).
fn freezer_of(init: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{init}/cgroup")).ok()?;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next()?, f.next()?);
        if ctrl.split(',').any(|c| c == "freezer") {
            return Some(PathBuf::from(format!("/sys/fs/cgroup/freezer{path}")));
        }
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        return Some(PathBuf::from(format!("/sys/fs/cgroup{path}")));
    }
    None
}

/// The directory listing the container's processes: its freezer (or unified) cgroup.
fn cgroup_dir_of(init: i32) -> Option<PathBuf> {
    freezer_of(init).filter(|p| p.is_dir())
}

fn write_atomic(path: &Path, text: &str) -> PluginResult<()> {
    let tmp = path.with_extension("phaul-new");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            PluginError::failed(format!("cannot write {} ({e})", path.display()))
        })
}

impl HostType for Lxc {
    fn root_pid(&mut self) -> PluginResult<i32> {
        if self.role != Role::SOURCE {
            return Err(PluginError::invalid("root_pid is asked of the source only"));
        }
        let c = self.read_config()?;
        if self.dir().join(MARKER).exists() {
            return Err(PluginError::invalid(format!(
                "container '{}' was migrated away from this host by phaul ({} exists): its copy runs elsewhere",
                self.name,
                self.dir().join(MARKER).display()
            )));
        }
        let state = self.state()?;
        if state != "RUNNING" {
            return Err(PluginError::invalid(format!(
                "container '{}' in {} is {state}, not RUNNING: start it (lxc-start -n {} -P {}) before migrating it",
                self.name,
                self.lxcpath.display(),
                self.name,
                self.lxcpath.display()
            )));
        }
        let init = self.init_pid()?;
        self.check_carriable(&c, init)?;
        if !self.trust_config {
            if let Some((k, v, why)) = trust::first_refused(&c) {
                return Err(PluginError::unsupported(format!(
                    "container '{}' has {k} = {v} in {}: {why}. A destination does not take such a key from a source unless its operator trusts the source's configuration (`phaul serve --htype-opt lxc:trust-config=yes`); remove it, or pass --htype-opt trust-config=yes here once the destination trusts it",
                    self.name,
                    self.config_path().display()
                )));
            }
        }
        if self.mode == Mode::LIVE {
            let have_iptables = ["/usr/sbin/iptables-restore", "/sbin/iptables-restore", "/usr/bin/iptables-restore"]
                .iter()
                .any(|p| Path::new(p).exists());
            if !have_iptables {
                return Err(PluginError::not_found(
                    "CRIU locks a container's network with iptables-restore (as liblxc's restore expects), and this host has none: install the iptables package",
                ));
            }
            if let Some(tty) = self.console_tty_id(&c, init)? {
                let p = self.work.join("tty.info");
                std::fs::write(&p, &tty)
                    .map_err(|e| PluginError::failed(format!("cannot write {} ({e})", p.display())))?;
                log::info!("container '{}': its console {tty} is carried as an external tty", self.name);
                self.console = Some(tty);
            } else {
                log::info!("container '{}' has no console (lxc.console.path = none)", self.name);
            }
        }
        self.init = Some(init);
        self.config = Some(c);
        Ok(init)
    }

    fn fs_roots(&mut self) -> PluginResult<Vec<String>> {
        let c = match &self.config {
            Some(c) => c.clone(),
            None => self.read_config()?,
        };
        Ok(vec![self.source_rootfs(&c)?.path.trim_end_matches('/').to_string()])
    }

    fn criu_options(&mut self, stage: CriuStage) -> PluginResult<CriuOptions> {
        match stage {
            CriuStage::PRE_DUMP | CriuStage::DUMP => self.dump_options(),
            // liblxc builds the restore's options itself.
            _ => Ok(CriuOptions::default()),
        }
    }

    fn extra_files(&mut self) -> PluginResult<Vec<ExtraFile>> {
        let mut v = vec![ExtraFile { path: self.config_path().display().to_string().into(), name: "config".into() }];
        let tty = self.work.join("tty.info");
        if tty.is_file() {
            v.push(ExtraFile { path: tty.display().to_string().into(), name: "tty.info".into() });
        }
        Ok(v)
    }

    fn install_extra_files(&mut self, dir: &str) -> PluginResult<()> {
        let p = Path::new(dir).join("config");
        let size = std::fs::metadata(&p).map(|m| m.len()).map_err(|e| {
            PluginError::failed(format!("the source sent no container configuration ({}: {e})", p.display()))
        })?;
        if size > MAX_CONFIG {
            return Err(PluginError::invalid(format!(
                "the container configuration the source sent is {size} bytes; at most {MAX_CONFIG} are accepted"
            )));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| {
            PluginError::invalid(format!("the container configuration the source sent is not text ({e})"))
        })?;
        self.received = Some(Config::parse(&text));
        let t = Path::new(dir).join("tty.info");
        if t.is_file() {
            let s = std::fs::read_to_string(&t).unwrap_or_default();
            let s = s.trim();
            let ok = s.strip_prefix("tty[").and_then(|r| r.strip_suffix(']')).is_some_and(|r| {
                r.split_once(':').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && (a.to_string() + b).chars().all(|c| c.is_ascii_hexdigit())
                })
            });
            if !ok {
                return Err(PluginError::invalid(format!(
                    "the console id the source sent ({s:?}) is not tty[RDEV:DEV]"
                )));
            }
            self.tty_info = Some(s.to_string());
        }
        Ok(())
    }

    fn mount_root(&mut self, prepared: &[KeyValue]) -> PluginResult<Option<String>> {
        if self.role == Role::DESTINATION {
            if self.received.is_none() {
                return Err(PluginError::failed(
                    "the source sent no container configuration: is it an older phaul that carries no extra files in restart mode?",
                ));
            }
            self.write_config_here(prepared)?;
        }
        // liblxc mounts the root itself.
        Ok(None)
    }

    fn restores_itself(&self) -> bool {
        true
    }

    fn restore(&mut self, req: &RestoreRequest) -> PluginResult<i32> {
        let images = Path::new(req.images_dir.as_str());
        if let Some(tty) = &self.tty_info {
            let p = images.join("tty.info");
            std::fs::write(&p, tty).map_err(|e| PluginError::failed(format!("cannot write {} ({e})", p.display())))?;
        }
        let criu = option(&req.more, "criu").unwrap_or("criu");
        let bin = self.criu_for_liblxc(criu, Some(req.action_script.as_str()))?;
        let tools = self.tools.with_path_prefix(&bin);
        let p = self.lxcpath.display().to_string();
        let d = images.display().to_string();
        self.started_here = true;
        log::info!("restoring container '{}' through liblxc (lxc-checkpoint -r) into {p}", self.name);
        let log = self.work.join("lxc-checkpoint.log");
        let l = log.display().to_string();
        let (ok, out) = tools.run_status(
            "lxc-checkpoint",
            &["-r", "-P", &p, "-n", &self.name, "-D", &d, "-o", &l, "-l", "ERROR"],
            RESTORE_TIMEOUT,
            "restoring the container with lxc-checkpoint -r",
        )?;
        if !ok {
            // The roll-back may not reach this host type while the engine waits: undo here and now.
            if let Err(e) = self.undo_here() {
                log::error!("{e}");
            }
            let errors = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(PluginError::failed(format!(
                "liblxc's restore (lxc-checkpoint -r) failed: {}\nLXC's log ({l}):\n{}",
                tail(&format!("{}{}", out.stdout, out.stderr), 1500),
                tail(&errors, 1500)
            )));
        }
        if !self.wait_state("RUNNING", QUICK) {
            return Err(PluginError::failed(format!(
                "lxc-checkpoint -r returned, but container '{}' is not RUNNING here",
                self.name
            )));
        }
        let pid = self.init_pid()?;
        // lxc-checkpoint returns once phaul's hold let the container run: the commit.
        self.release_claim();
        Ok(pid)
    }

    fn discard(&mut self, _pid: i32) -> PluginResult<bool> {
        if self.role != Role::DESTINATION || !self.started_here {
            return Ok(false);
        }
        match self.lxc("lxc-stop", &["-k"], QUICK, "killing the restored container") {
            Ok(_) => Ok(self.wait_state("STOPPED", QUICK)),
            Err(e) => {
                log::warn!("{e}; phaul kills the restored tree by pid");
                Ok(false)
            }
        }
    }

    fn can_restart(&self) -> bool {
        true
    }

    fn stop(&mut self) -> PluginResult<()> {
        let t = self.stop_timeout.to_string();
        self.lxc(
            "lxc-stop",
            &["-t", &t],
            Duration::from_secs(self.stop_timeout + 30),
            "stopping the container (lxc-stop)",
        )?;
        if !self.wait_state("STOPPED", QUICK) {
            return Err(PluginError::failed(format!(
                "lxc-stop returned, but container '{}' is not STOPPED",
                self.name
            )));
        }
        Ok(())
    }

    fn start(&mut self) -> PluginResult<i32> {
        self.started_here = true;
        let log = self.work.join("lxc-start.log");
        let _ = std::fs::remove_file(&log);
        let l = log.display().to_string();
        let started = self.lxc("lxc-start", &["-o", &l, "-l", "ERROR"], QUICK, "starting the container (lxc-start)");
        if started.is_err() || !self.wait_state("RUNNING", QUICK) {
            // Whatever came up must not run beside the copy the source starts again.
            self.kill_here();
        }
        if let Err(e) = started {
            let errors = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(PluginError::failed(format!("{e}\nLXC's log ({l}):\n{}", tail(&errors, 1500))));
        }
        if !self.wait_state("RUNNING", QUICK) {
            return Err(PluginError::failed(format!(
                "lxc-start returned, but container '{}' did not reach RUNNING within {} s",
                self.name,
                QUICK.as_secs()
            )));
        }
        let pid = self.init_pid()?;
        // Restart mode's Start is its point of no return: the configuration is this host's now.
        self.release_claim();
        Ok(pid)
    }

    fn report(&mut self) -> PluginResult<Vec<KeyValue>> {
        if self.role != Role::SOURCE {
            return Ok(Vec::new());
        }
        let mut v = vec![KeyValue::new("container", format!("{} in {}", self.name, self.lxcpath.display()))];
        if let Some(c) = &self.config {
            if let Ok(r) = self.source_rootfs(c) {
                v.push(KeyValue::new("rootfs", format!("{}:{} (moved by the filesystem driver)", r.kind, r.path)));
            }
        }
        let console = match (&self.console, self.mode) {
            (_, Mode::RESTART) => "restart mode: a new console at the start on the destination".to_string(),
            (Some(t), _) => format!(
                "{t}, carried as an external tty: the destination's liblxc gave it a new pty, its master held by LXC's monitor there (lxc-console)"
            ),
            (None, _) => "none (lxc.console.path = none)".to_string(),
        };
        v.push(KeyValue::new("console", console));
        if let Some(Err(e)) = &self.marked {
            v.push(KeyValue::new(
                "left here",
                format!(
                    "stopped, but NOT marked as migrated away ({e}): set lxc.start.auto = 0 in {} by hand",
                    self.config_path().display()
                ),
            ));
        } else if self.outcome == Some(Outcome::MIGRATED) {
            v.push(KeyValue::new(
                "left here",
                format!(
                    "stopped, configuration and root filesystem kept; lxc.start.auto = 0 and the pre-start hook {} refuse a second start",
                    self.dir().join(MARKER).display()
                ),
            ));
        }
        Ok(v)
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        self.outcome = Some(outcome);
        match (self.role, outcome) {
            (Role::SOURCE, Outcome::MIGRATED) => {
                // The commit ended the tree; LXC's monitor sees its init go.
                if !self.wait_state("STOPPED", QUICK) {
                    log::warn!("container '{}' is not STOPPED here yet after the migration", self.name);
                }
                let marked = self.mark_migrated_away();
                self.marked = Some(marked.clone().map_err(|e| e.to_string()));
                if let Err(e) = &marked {
                    log::error!(
                        "container '{}' migrated, but marking it here as migrated away failed ({e}): set lxc.start.auto = 0 in {} by hand, or a reboot starts a second copy",
                        self.name,
                        self.config_path().display()
                    );
                    return marked;
                }
                log::info!(
                    "container '{}' is stopped here, its configuration and root filesystem kept; lxc.start.auto = 0 and {} refuse its start",
                    self.name,
                    self.dir().join(MARKER).display()
                );
                Ok(())
            }
            (Role::DESTINATION, Outcome::MIGRATED) => {
                self.release_claim();
                Ok(())
            }
            (Role::DESTINATION, Outcome::ROLLED_BACK) => self.undo_here(),
            _ => Ok(()),
        }
    }
}

phaul_abi::export_host_type!(
    name: "lxc",
    description: "an LXC container named by its name in an LXC path, restored by liblxc on the destination",
    new: new,
);
