//! Turning a host type's [`CriuOptions`] into CRIU's RPC options.

use phaul_abi::{CgroupMode, CriuOptions, NetworkLock};
use phaul_proto::criu::{CgroupRoot, CriuCgMode, CriuNetworkLockMethod, CriuOpts, InheritFd};

/// The lock method phaul asks CRIU for. `Auto` means nftables: CRIU does it through libnftables, so no iptables
/// binary is needed on either host.
pub fn network_lock_method(lock: NetworkLock) -> CriuNetworkLockMethod {
    match lock {
        NetworkLock::Auto | NetworkLock::Nftables => CriuNetworkLockMethod::Nftables,
        NetworkLock::Iptables => CriuNetworkLockMethod::Iptables,
        NetworkLock::Skip => CriuNetworkLockMethod::Skip,
    }
}

fn cg_mode(m: CgroupMode) -> Option<CriuCgMode> {
    match m {
        CgroupMode::CriuDefault => None,
        CgroupMode::Ignore => Some(CriuCgMode::Ignore),
        CgroupMode::None => Some(CriuCgMode::CgNone),
        CgroupMode::Props => Some(CriuCgMode::Props),
        CgroupMode::Soft => Some(CriuCgMode::Soft),
        CgroupMode::Full => Some(CriuCgMode::Full),
        CgroupMode::Strict => Some(CriuCgMode::Strict),
    }
}

fn flag(v: bool) -> Option<bool> {
    v.then_some(true)
}

/// Adds a host type's options to `base` (which already names the directories and the log).
pub fn build_opts(mut base: CriuOpts, h: &CriuOptions) -> CriuOpts {
    base.shell_job = flag(h.shell_job);
    base.tcp_established = flag(h.tcp_established);
    base.ext_unix_sk = flag(h.ext_unix_sk);
    base.file_locks = flag(h.file_locks);
    base.link_remap = flag(h.link_remap);
    base.evasive_devices = flag(h.evasive_devices);
    base.orphan_pts_master = flag(h.orphan_pts_master);
    base.mntns_compat_mode = flag(h.mntns_compat_mode);
    base.force_irmap = flag(h.force_irmap);
    base.tcp_skip_in_flight = flag(h.tcp_skip_in_flight);
    if let Some(m) = cg_mode(h.manage_cgroups) {
        base.manage_cgroups = Some(true);
        base.set_manage_cgroups_mode(m);
    }
    base.set_network_lock(network_lock_method(h.network_lock));
    base.root = h.root.as_ref().map(|r| r.to_string()).into_option();
    base.freeze_cgroup = h.freeze_cgroup.as_ref().map(|r| r.to_string()).into_option();
    base.lsm_profile = h.lsm_profile.as_ref().map(|r| r.to_string()).into_option();
    base.external = h.external.iter().map(|s| s.to_string()).collect();
    base.skip_mnt = h.skip_mnt.iter().map(|s| s.to_string()).collect();
    base.enable_fs = h.enable_fs.iter().map(|s| s.to_string()).collect();
    base.cg_root = h
        .cgroup_roots
        .iter()
        .map(|c| CgroupRoot {
            ctrl: c.controller.as_ref().map(|s| s.to_string()).into_option(),
            path: c.path.to_string(),
        })
        .collect();
    base.inherit_fd = h.inherit_fds.iter().map(|i| InheritFd { key: i.key.to_string(), fd: i.fd }).collect();
    base
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::{RSome, RVec};

    #[test]
    fn host_options_reach_criu() {
        let h = CriuOptions {
            tcp_established: true,
            shell_job: true,
            external: RVec::from(vec!["mnt[/x]:y".into()]),
            root: RSome("/r".into()),
            manage_cgroups: CgroupMode::Soft,
            ..Default::default()
        };
        let o = build_opts(CriuOpts::default(), &h);
        assert_eq!(o.tcp_established, Some(true));
        assert_eq!(o.shell_job, Some(true));
        assert_eq!(o.ext_unix_sk, None);
        assert_eq!(o.external, vec!["mnt[/x]:y".to_string()]);
        assert_eq!(o.root.as_deref(), Some("/r"));
        assert_eq!(o.manage_cgroups_mode(), CriuCgMode::Soft);
        assert_eq!(o.network_lock(), CriuNetworkLockMethod::Nftables);
    }
}
