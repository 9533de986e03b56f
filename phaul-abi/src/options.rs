//! The CRIU options a host type asks for. Plugin authors fill the typed [`CriuOptions`]; it crosses the boundary as
//! a list of `key = value` pairs ([`CriuOptions::to_list`]), so a later revision of the interface can add options
//! without changing any layout: an older plugin simply never sends the new keys.
//!
//! | key | value | CRIU |
//! |---|---|---|
//! | `shell-job`, `tcp-established`, `tcp-close`, `tcp-skip-in-flight`, `ext-unix-sk`, `file-locks`, `link-remap`, `evasive-devices`, `orphan-pts-master`, `mntns-compat-mode`, `force-irmap`, `auto-ext-mnt`, `ext-sharing`, `ext-masters`, `rst-sibling` | `true` | the option of that name |
//! | `manage-cgroups` | `ignore`, `none`, `props`, `soft`, `full`, `strict` | `--manage-cgroups` |
//! | `network-lock` | `iptables`, `nftables`, `skip` | `--network-lock` (`skip`: the host type locks from its hooks) |
//! | `root`, `freeze-cgroup`, `lsm-profile`, `cgroup-props`, `cgroup-yard` | a string | the option of that name |
//! | `ghost-limit` | bytes | `--ghost-limit` (interface revision 3) |
//! | `external`, `skip-mnt`, `enable-fs` | a string, repeated | the option of that name |
//! | `ext-mnt` | `KEY:VALUE`, repeated | `--ext-mount-map KEY:VALUE` |
//! | `cgroup-root` | `[CONTROLLER:]PATH`, repeated | `--cgroup-root` |
//! | `inherit-fd` | `KEY=FD`, repeated | `--inherit-fd fd[FD]:KEY` (FD open in the phaul process; phaul passes it to CRIU) |

use abi_stable::std_types::RVec;

use crate::types::KeyValue;

/// How CRIU should treat cgroups (CRIU's `--manage-cgroups` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    Ignore,
    None,
    Props,
    Soft,
    Full,
    Strict,
}

impl CgroupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::Ignore => "ignore",
            CgroupMode::None => "none",
            CgroupMode::Props => "props",
            CgroupMode::Soft => "soft",
            CgroupMode::Full => "full",
            CgroupMode::Strict => "strict",
        }
    }

    fn parse(s: &str) -> Option<CgroupMode> {
        Some(match s {
            "ignore" => CgroupMode::Ignore,
            "none" => CgroupMode::None,
            "props" => CgroupMode::Props,
            "soft" => CgroupMode::Soft,
            "full" => CgroupMode::Full,
            "strict" => CgroupMode::Strict,
            _ => return None,
        })
    }
}

/// How CRIU locks the network while the tree is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkLock {
    /// Let phaul choose (nftables: it needs no external binary).
    #[default]
    Auto,
    Iptables,
    Nftables,
    /// CRIU does not lock; the host type does it from its `network-lock` notification.
    Skip,
}

/// CRIU options a host type adds to the ones phaul sets itself (see the module documentation for the keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuOptions {
    pub shell_job: bool,
    pub tcp_established: bool,
    /// Restore established TCP connections closed (CRIU's `--tcp-close`).
    pub tcp_close: bool,
    /// Skip half-open ("in-flight") TCP connections instead of failing the dump: their clients retransmit SYN.
    pub tcp_skip_in_flight: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub link_remap: bool,
    pub evasive_devices: bool,
    /// Ask CRIU to hand the master of a pty whose master is outside the tree to the host type
    /// (`orphan-pts-master` notification).
    pub orphan_pts_master: bool,
    pub mntns_compat_mode: bool,
    pub force_irmap: bool,
    pub auto_ext_mnt: bool,
    pub ext_sharing: bool,
    pub ext_masters: bool,
    /// Restore the tree as a sibling of CRIU instead of its child (CRIU's `--restore-sibling`).
    pub rst_sibling: bool,
    pub manage_cgroups: Option<CgroupMode>,
    pub network_lock: NetworkLock,
    /// Root of the restored tree's mount namespace (restore only).
    pub root: Option<String>,
    /// A cgroup CRIU freezes instead of walking the tree with ptrace.
    pub freeze_cgroup: Option<String>,
    pub lsm_profile: Option<String>,
    pub cgroup_props: Option<String>,
    pub cgroup_yard: Option<String>,
    /// Largest deleted-but-open file CRIU carries in the images, bytes (interface revision 3).
    pub ghost_limit: Option<u64>,
    /// CRIU's `--external` resources (`mnt[...]`, `veth[...]`, `tty[...]`, ...).
    pub external: Vec<String>,
    pub skip_mnt: Vec<String>,
    pub enable_fs: Vec<String>,
    /// External mount maps (`--ext-mount-map KEY:VALUE`).
    pub ext_mounts: Vec<(String, String)>,
    /// Cgroup root maps (`--cgroup-root [controller:]path`).
    pub cgroup_roots: Vec<(Option<String>, String)>,
    /// Descriptors handed to CRIU for restore (`--inherit-fd fd[N]:KEY`): (key, descriptor in this process).
    pub inherit_fds: Vec<(String, i32)>,
}

const FLAGS: &[&str] = &[
    "shell-job",
    "tcp-established",
    "tcp-close",
    "tcp-skip-in-flight",
    "ext-unix-sk",
    "file-locks",
    "link-remap",
    "evasive-devices",
    "orphan-pts-master",
    "mntns-compat-mode",
    "force-irmap",
    "auto-ext-mnt",
    "ext-sharing",
    "ext-masters",
    "rst-sibling",
];

impl CriuOptions {
    fn flag_mut(&mut self, key: &str) -> Option<&mut bool> {
        Some(match key {
            "shell-job" => &mut self.shell_job,
            "tcp-established" => &mut self.tcp_established,
            "tcp-close" => &mut self.tcp_close,
            "tcp-skip-in-flight" => &mut self.tcp_skip_in_flight,
            "ext-unix-sk" => &mut self.ext_unix_sk,
            "file-locks" => &mut self.file_locks,
            "link-remap" => &mut self.link_remap,
            "evasive-devices" => &mut self.evasive_devices,
            "orphan-pts-master" => &mut self.orphan_pts_master,
            "mntns-compat-mode" => &mut self.mntns_compat_mode,
            "force-irmap" => &mut self.force_irmap,
            "auto-ext-mnt" => &mut self.auto_ext_mnt,
            "ext-sharing" => &mut self.ext_sharing,
            "ext-masters" => &mut self.ext_masters,
            "rst-sibling" => &mut self.rst_sibling,
            _ => return None,
        })
    }

    /// The list that crosses the boundary: only what differs from the defaults.
    pub fn to_list(&self) -> RVec<KeyValue> {
        let mut v = Vec::new();
        let mut me = self.clone();
        for f in FLAGS {
            if me.flag_mut(f).is_some_and(|b| *b) {
                v.push(KeyValue::new(*f, "true"));
            }
        }
        if let Some(m) = self.manage_cgroups {
            v.push(KeyValue::new("manage-cgroups", m.as_str()));
        }
        match self.network_lock {
            NetworkLock::Auto => {}
            NetworkLock::Iptables => v.push(KeyValue::new("network-lock", "iptables")),
            NetworkLock::Nftables => v.push(KeyValue::new("network-lock", "nftables")),
            NetworkLock::Skip => v.push(KeyValue::new("network-lock", "skip")),
        }
        for (k, o) in [
            ("root", &self.root),
            ("freeze-cgroup", &self.freeze_cgroup),
            ("lsm-profile", &self.lsm_profile),
            ("cgroup-props", &self.cgroup_props),
            ("cgroup-yard", &self.cgroup_yard),
        ] {
            if let Some(s) = o {
                v.push(KeyValue::new(k, s.as_str()));
            }
        }
        if let Some(g) = self.ghost_limit {
            v.push(KeyValue::new("ghost-limit", g.to_string()));
        }
        for (k, list) in [("external", &self.external), ("skip-mnt", &self.skip_mnt), ("enable-fs", &self.enable_fs)] {
            v.extend(list.iter().map(|s| KeyValue::new(k, s.as_str())));
        }
        v.extend(self.ext_mounts.iter().map(|(k, val)| KeyValue::new("ext-mnt", format!("{k}:{val}"))));
        v.extend(self.cgroup_roots.iter().map(|(c, p)| match c {
            Some(c) => KeyValue::new("cgroup-root", format!("{c}:{p}")),
            None => KeyValue::new("cgroup-root", p.as_str()),
        }));
        v.extend(self.inherit_fds.iter().map(|(k, fd)| KeyValue::new("inherit-fd", format!("{k}={fd}"))));
        RVec::from(v)
    }

    /// Reads a list; a key this revision does not know, or a malformed value, is an error naming it.
    pub fn from_list(list: &[KeyValue]) -> Result<CriuOptions, String> {
        let mut o = CriuOptions::default();
        for kv in list {
            let (k, v) = (kv.key.as_str(), kv.value.as_str());
            let bad = || format!("the CRIU option {k} = {v:?} is malformed");
            if let Some(f) = o.flag_mut(k) {
                *f = match v {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad()),
                };
                continue;
            }
            match k {
                "manage-cgroups" => o.manage_cgroups = Some(CgroupMode::parse(v).ok_or_else(bad)?),
                "network-lock" => {
                    o.network_lock = match v {
                        "auto" => NetworkLock::Auto,
                        "iptables" => NetworkLock::Iptables,
                        "nftables" => NetworkLock::Nftables,
                        "skip" => NetworkLock::Skip,
                        _ => return Err(bad()),
                    }
                }
                "root" => o.root = Some(v.into()),
                "freeze-cgroup" => o.freeze_cgroup = Some(v.into()),
                "lsm-profile" => o.lsm_profile = Some(v.into()),
                "cgroup-props" => o.cgroup_props = Some(v.into()),
                "cgroup-yard" => o.cgroup_yard = Some(v.into()),
                "ghost-limit" => o.ghost_limit = Some(v.parse().map_err(|_| bad())?),
                "external" => o.external.push(v.into()),
                "skip-mnt" => o.skip_mnt.push(v.into()),
                "enable-fs" => o.enable_fs.push(v.into()),
                "ext-mnt" => {
                    let (a, b) = v.split_once(':').ok_or_else(bad)?;
                    o.ext_mounts.push((a.into(), b.into()));
                }
                "cgroup-root" => o.cgroup_roots.push(match v.split_once(':') {
                    Some((c, p)) => (Some(c.into()), p.into()),
                    None => (None, v.into()),
                }),
                "inherit-fd" => {
                    let (key, fd) = v.rsplit_once('=').ok_or_else(bad)?;
                    o.inherit_fds.push((key.into(), fd.parse().map_err(|_| bad())?));
                }
                _ => return Err(format!("the CRIU option {k:?} is not one this phaul knows")),
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_reads_back_as_it_was_written() {
        let o = CriuOptions {
            tcp_established: true,
            rst_sibling: true,
            manage_cgroups: Some(CgroupMode::Soft),
            network_lock: NetworkLock::Skip,
            root: Some("/var/lib/lxc/c1/rootfs".into()),
            ghost_limit: Some(1 << 20),
            external: vec!["veth[eth0]:vethXYZ".into()],
            ext_mounts: vec![("/proc/self/fd".into(), "/dev/fd".into())],
            cgroup_roots: vec![(None, "/lxc/c1".into()), (Some("cpu".into()), "/x".into())],
            inherit_fds: vec![("tty[88:1]".into(), 7)],
            ..Default::default()
        };
        assert_eq!(CriuOptions::from_list(&o.to_list()), Ok(o));
        assert!(CriuOptions::default().to_list().is_empty());
    }

    #[test]
    fn unknown_and_malformed_keys_are_named() {
        let e = CriuOptions::from_list(&[KeyValue::new("warp-drive", "true")]).expect_err("refused");
        assert!(e.contains("warp-drive"), "{e}");
        let e = CriuOptions::from_list(&[KeyValue::new("inherit-fd", "nofd")]).expect_err("refused");
        assert!(e.contains("inherit-fd"), "{e}");
    }
}
