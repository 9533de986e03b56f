//! Turning a host type's [`CriuOptions`] into CRIU's RPC options.

use phaul_abi::{CgroupMode, CriuOptions, NetworkLock};
use phaul_proto::criu::{CgroupRoot, CriuCgMode, CriuNetworkLockMethod, CriuOpts, ExtMountMap, InheritFd};

/// The lock method phaul asks CRIU for. `Auto` means nftables: CRIU does it through libnftables, so no iptables
/// binary is needed on either host.
pub fn network_lock_method(lock: NetworkLock) -> CriuNetworkLockMethod {
    match lock {
        NetworkLock::Auto | NetworkLock::Nftables => CriuNetworkLockMethod::Nftables,
        NetworkLock::Iptables => CriuNetworkLockMethod::Iptables,
        NetworkLock::Skip => CriuNetworkLockMethod::Skip,
    }
}

fn cg_mode(m: CgroupMode) -> CriuCgMode {
    match m {
        CgroupMode::Ignore => CriuCgMode::Ignore,
        CgroupMode::None => CriuCgMode::CgNone,
        CgroupMode::Props => CriuCgMode::Props,
        CgroupMode::Soft => CriuCgMode::Soft,
        CgroupMode::Full => CriuCgMode::Full,
        CgroupMode::Strict => CriuCgMode::Strict,
    }
}

fn flag(v: bool) -> Option<bool> {
    v.then_some(true)
}

/// The same options as `criu restore` command-line arguments, for a host type that runs CRIU as a command
/// (`HostType::restore`). `orphan-pts-master` has no command-line form (CRIU offers it over RPC only) and is left
/// out; `--freeze-cgroup` is a dump option and is left out too. Inherited descriptors keep their numbers in the
/// host type's process, which must pass them to the command it runs.
pub fn command_line_args(h: &CriuOptions) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let flags = [
        (h.shell_job, "--shell-job"),
        (h.tcp_established, "--tcp-established"),
        (h.tcp_close, "--tcp-close"),
        (h.tcp_skip_in_flight, "--skip-in-flight"),
        (h.ext_unix_sk, "--ext-unix-sk"),
        (h.file_locks, "--file-locks"),
        (h.link_remap, "--link-remap"),
        (h.evasive_devices, "--evasive-devices"),
        (h.mntns_compat_mode, "--mntns-compat-mode"),
        (h.force_irmap, "--force-irmap"),
        (h.ext_sharing, "--enable-external-sharing"),
        (h.ext_masters, "--enable-external-masters"),
        (h.rst_sibling, "--restore-sibling"),
    ];
    a.extend(flags.iter().filter(|(on, _)| *on).map(|(_, f)| f.to_string()));
    if h.auto_ext_mnt {
        a.extend(["--ext-mount-map".into(), "auto".into()]);
    }
    if let Some(m) = h.manage_cgroups {
        a.push(format!("--manage-cgroups={}", m.as_str()));
    }
    let lock = match network_lock_method(h.network_lock) {
        CriuNetworkLockMethod::Iptables => "iptables",
        CriuNetworkLockMethod::Nftables => "nftables",
        CriuNetworkLockMethod::Skip => "skip",
    };
    a.extend(["--network-lock".into(), lock.into()]);
    let valued = [
        ("--root", &h.root),
        ("--lsm-profile", &h.lsm_profile),
        ("--cgroup-props", &h.cgroup_props),
        ("--cgroup-yard", &h.cgroup_yard),
    ];
    for (flag, v) in valued {
        if let Some(v) = v {
            a.extend([flag.to_string(), v.clone()]);
        }
    }
    if let Some(g) = h.ghost_limit {
        a.extend(["--ghost-limit".into(), g.to_string()]);
    }
    for (flag, list) in [("--external", &h.external), ("--skip-mnt", &h.skip_mnt), ("--enable-fs", &h.enable_fs)] {
        for v in list {
            a.extend([flag.to_string(), v.clone()]);
        }
    }
    for (k, v) in &h.ext_mounts {
        a.extend(["--ext-mount-map".into(), format!("{k}:{v}")]);
    }
    for (c, p) in &h.cgroup_roots {
        a.extend(["--cgroup-root".into(), c.as_ref().map(|c| format!("{c}:{p}")).unwrap_or_else(|| p.clone())]);
    }
    for (key, fd) in &h.inherit_fds {
        a.extend(["--inherit-fd".into(), format!("fd[{fd}]:{key}")]);
    }
    a
}

/// Where descriptors handed to CRIU (`inherit_fd`) start in CRIU's own table.
pub const INHERIT_FD_BASE: i32 = 100;

/// Descriptors to pass into CRIU's process with the options: (a duplicate of the host type's descriptor, its number
/// in CRIU). Give them to [`crate::criu::CriuBackend::session`].
pub type PassedFds = Vec<(std::os::fd::OwnedFd, i32)>;

/// Adds a host type's options to `base` (which already names the directories and the log); returns the
/// descriptors CRIU must inherit (the host type's `inherit_fds`, renumbered from [`INHERIT_FD_BASE`] in CRIU's
/// table).
pub fn build_opts(mut base: CriuOpts, h: &CriuOptions) -> Result<(CriuOpts, PassedFds), std::io::Error> {
    base.shell_job = flag(h.shell_job);
    base.tcp_established = flag(h.tcp_established);
    base.tcp_close = flag(h.tcp_close);
    base.ext_unix_sk = flag(h.ext_unix_sk);
    base.file_locks = flag(h.file_locks);
    base.link_remap = flag(h.link_remap);
    base.evasive_devices = flag(h.evasive_devices);
    base.orphan_pts_master = flag(h.orphan_pts_master);
    base.mntns_compat_mode = flag(h.mntns_compat_mode);
    base.force_irmap = flag(h.force_irmap);
    base.tcp_skip_in_flight = flag(h.tcp_skip_in_flight);
    base.auto_ext_mnt = flag(h.auto_ext_mnt);
    base.ext_sharing = flag(h.ext_sharing);
    base.ext_masters = flag(h.ext_masters);
    base.rst_sibling = flag(h.rst_sibling);
    if let Some(m) = h.manage_cgroups {
        base.manage_cgroups = Some(true);
        base.set_manage_cgroups_mode(cg_mode(m));
    }
    base.set_network_lock(network_lock_method(h.network_lock));
    base.root = h.root.clone();
    base.freeze_cgroup = h.freeze_cgroup.clone();
    base.lsm_profile = h.lsm_profile.clone();
    base.cgroup_props = h.cgroup_props.clone();
    base.cgroup_yard = h.cgroup_yard.clone();
    if let Some(g) = h.ghost_limit {
        base.ghost_limit = Some(u32::try_from(g).unwrap_or(u32::MAX));
    }
    base.external = h.external.clone();
    base.skip_mnt = h.skip_mnt.clone();
    base.enable_fs = h.enable_fs.clone();
    base.ext_mnt = h.ext_mounts.iter().map(|(k, v)| ExtMountMap { key: k.clone(), val: v.clone() }).collect();
    base.cg_root = h.cgroup_roots.iter().map(|(c, p)| CgroupRoot { ctrl: c.clone(), path: p.clone() }).collect();
    let mut fds = PassedFds::new();
    for (i, (key, fd)) in h.inherit_fds.iter().enumerate() {
        let own = phaul_abi::dup_fd(*fd).map_err(|e| {
            std::io::Error::new(e.kind(), format!("the host type's inherit-fd {key} (descriptor {fd}): {e}"))
        })?;
        let n = INHERIT_FD_BASE + i as i32;
        fds.push((own, n));
        base.inherit_fd.push(InheritFd { key: key.clone(), fd: n });
    }
    Ok((base, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_criu_command_line_arguments() {
        let h = CriuOptions {
            shell_job: true,
            tcp_skip_in_flight: true,
            rst_sibling: true,
            orphan_pts_master: true,
            manage_cgroups: Some(CgroupMode::Soft),
            root: Some("/r".into()),
            ghost_limit: Some(4096),
            external: vec!["mnt[/x]:y".into()],
            ext_mounts: vec![("/a".into(), "/b".into())],
            cgroup_roots: vec![(Some("cpu".into()), "/c".into()), (None, "/all".into())],
            inherit_fds: vec![("tty[8:0]".into(), 7)],
            ..Default::default()
        };
        let a = command_line_args(&h).join(" ");
        assert_eq!(
            a,
            "--shell-job --skip-in-flight --restore-sibling --manage-cgroups=soft --network-lock nftables --root /r \
             --ghost-limit 4096 --external mnt[/x]:y --ext-mount-map /a:/b --cgroup-root cpu:/c --cgroup-root /all \
             --inherit-fd fd[7]:tty[8:0]"
        );
        assert_eq!(command_line_args(&CriuOptions::default()).join(" "), "--network-lock nftables");
    }

    #[test]
    fn host_options_reach_criu() {
        let h = CriuOptions {
            tcp_established: true,
            shell_job: true,
            rst_sibling: true,
            external: vec!["mnt[/x]:y".into()],
            ext_mounts: vec![("/a".into(), "/b".into())],
            root: Some("/r".into()),
            manage_cgroups: Some(CgroupMode::Soft),
            ghost_limit: Some(4096),
            ..Default::default()
        };
        let (o, fds) = build_opts(CriuOpts::default(), &h).expect("options");
        assert!(fds.is_empty());
        assert_eq!(o.tcp_established, Some(true));
        assert_eq!(o.shell_job, Some(true));
        assert_eq!(o.rst_sibling, Some(true));
        assert_eq!(o.ext_unix_sk, None);
        assert_eq!(o.external, vec!["mnt[/x]:y".to_string()]);
        assert_eq!(o.ext_mnt[0].val, "/b");
        assert_eq!(o.root.as_deref(), Some("/r"));
        assert_eq!(o.ghost_limit, Some(4096));
        assert_eq!(o.manage_cgroups_mode(), CriuCgMode::Soft);
        assert_eq!(o.network_lock(), CriuNetworkLockMethod::Nftables);
    }

    #[test]
    fn inherited_descriptors_are_passed_to_criu() {
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let h = CriuOptions { inherit_fds: vec![("tty[88:1]".into(), fd)], ..Default::default() };
        let (o, fds) = build_opts(CriuOpts::default(), &h).expect("options");
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].1, INHERIT_FD_BASE);
        assert_eq!(o.inherit_fd[0].fd, INHERIT_FD_BASE);
        assert_eq!(o.inherit_fd[0].key, "tty[88:1]");
        let closed = CriuOptions { inherit_fds: vec![("x".into(), 100_000)], ..Default::default() };
        assert!(build_opts(CriuOpts::default(), &closed).is_err());
    }
}
