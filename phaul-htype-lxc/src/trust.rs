//! Which keys of a container configuration a destination takes from a source without being told to trust it.
//!
//! liblxc acts on its configuration as root on the host: hooks and network scripts run there, mount entries bind
//! host paths into the container, log files are written where they say, namespaces can be shared with the host.
//! A destination takes only keys that describe the container itself (its name, network devices of the kinds phaul
//! carries, resource limits, capabilities it drops, the root filesystem phaul rewrites); any other key, or a value
//! that reaches outside (a bind mount of a host path, an include outside LXC's own configuration directory), is
//! refused with its name unless the destination's operator passed `trust-config=yes`.

use std::path::{Component, Path};

use crate::config::Config;

/// LXC's own shipped configuration, the only place an `lxc.include` may point at.
pub const LXC_SHARED_CONFIG: &str = "/usr/share/lxc/config";

/// Host directories a container may bind read-only (what LXC's own templates bind: the libraries of a busybox
/// container, the security filesystem).
const READ_ONLY_BINDS: &[&str] =
    &["/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/sys/kernel/security"];

/// Keys taken as they are.
const PLAIN: &[&str] = &[
    "lxc.uts.name",
    "lxc.arch",
    "lxc.autodev",
    "lxc.tty.max",
    "lxc.pty.max",
    "lxc.cap.drop",
    "lxc.cap.keep",
    "lxc.start.auto",
    "lxc.start.delay",
    "lxc.start.order",
    "lxc.group",
    "lxc.environment",
    "lxc.init.cmd",
    "lxc.init.cwd",
    "lxc.init.uid",
    "lxc.init.gid",
    "lxc.idmap",
    "lxc.rootfs.path",
    "lxc.apparmor.profile",
    "lxc.apparmor.allow_nesting",
    "lxc.apparmor.allow_incomplete",
    "lxc.selinux.context",
    "lxc.no_new_privs",
    "lxc.ephemeral",
    "lxc.keyring.session",
];

/// Keys of `lxc.net.N.` taken as they are.
const NET: &[&str] =
    &["type", "link", "flags", "name", "hwaddr", "mtu", "ipv4.address", "ipv4.gateway", "ipv6.address", "ipv6.gateway"];

/// Cgroup controllers whose limits are taken (`lxc.cgroup.C.*`, `lxc.cgroup2.C.*`); `devices` is not among them.
const LIMITS: &[&str] = &["memory", "pids", "cpu", "cpuset", "cpuacct", "blkio", "io", "hugetlb"];

/// Why `key = value` is not taken from a source, or `None` when it is.
pub fn refusal(key: &str, value: &str) -> Option<String> {
    if PLAIN.contains(&key) {
        return None;
    }
    if key.starts_with("lxc.signal.") || key.starts_with("lxc.prlimit.") || key.starts_with("lxc.proc.") {
        return None;
    }
    if let Some(rest) = key.strip_prefix("lxc.net.") {
        let field = rest.split_once('.').map(|(_, f)| f).unwrap_or_default();
        if !NET.contains(&field) {
            return Some("a network device setting phaul does not take from a source".into());
        }
        if field == "type" && !matches!(value, "veth" | "empty" | "none") {
            return Some("phaul carries veth, empty and none network devices only".into());
        }
        return None;
    }
    for prefix in ["lxc.cgroup.", "lxc.cgroup2."] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let controller = rest.split('.').next().unwrap_or_default();
            return (!LIMITS.contains(&controller))
                .then(|| format!("only limits of {} are taken from a source", LIMITS.join(", ")));
        }
    }
    match key {
        "lxc.console.path" => (value != "none" && value != "auto")
            .then(|| "the console must be LXC's own (auto) or none, not a host device".into()),
        "lxc.mount.auto" => value
            .split_whitespace()
            .find(|v| v.ends_with(":rw") && !v.starts_with("proc"))
            .map(|v| format!("'{v}' gives the container write access to the host's {}", v.trim_end_matches(":rw"))),
        "lxc.mount.entry" => mount_entry_refusal(value),
        "lxc.include" => include_refusal(value),
        _ => Some("a setting that acts on the host (hooks, scripts, logs, host namespaces, devices...)".into()),
    }
}

fn has_dot_dot(p: &str) -> bool {
    Path::new(p).components().any(|c| c == Component::ParentDir)
}

fn mount_entry_refusal(value: &str) -> Option<String> {
    let f: Vec<&str> = value.split_whitespace().collect();
    if f.len() < 4 {
        return Some("a mount entry phaul cannot read (SOURCE TARGET TYPE OPTIONS...)".into());
    }
    let (source, target, opts) = (f[0], f[1], f[3]);
    if has_dot_dot(target) || target.starts_with('/') {
        return Some("its target must be a path inside the container, without '..'".into());
    }
    let opts: Vec<&str> = opts.split(',').collect();
    if opts.iter().any(|o| *o == "bind" || *o == "rbind") {
        let allowed = READ_ONLY_BINDS.contains(&source.trim_end_matches('/')) && opts.contains(&"ro");
        if !allowed {
            return Some(format!(
                "it binds the host's {source} into the container; only read-only binds of {} are taken from a source",
                READ_ONLY_BINDS.join(", ")
            ));
        }
        return None;
    }
    // A filesystem mounted afresh (tmpfs, mqueue, proc...): its source is a name, not a host path.
    if source.starts_with('/') {
        return Some(format!("it mounts the host's {source}"));
    }
    None
}

fn include_refusal(value: &str) -> Option<String> {
    let ok = value.starts_with(&format!("{LXC_SHARED_CONFIG}/")) && !has_dot_dot(value);
    (!ok).then(|| format!("only files of {LXC_SHARED_CONFIG} may be included"))
}

/// The first key of `c` a destination does not take from a source, with why.
pub fn first_refused(c: &Config) -> Option<(String, String, String)> {
    c.entries().find_map(|(k, v)| refusal(k, v).map(|why| (k.to_string(), v.to_string(), why)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busybox_templates_keys_are_taken() {
        let c = Config::parse(
            "lxc.net.0.type = veth\nlxc.net.0.link = brA\nlxc.net.0.flags = up\nlxc.net.0.hwaddr = 00:16:3e:00:00:01\n\
             lxc.rootfs.path = dir:/var/lib/lxc/c/rootfs\nlxc.signal.halt = SIGUSR1\nlxc.uts.name = \"c\"\nlxc.autodev = 1\n\
             lxc.tty.max = 0\nlxc.pty.max = 1\nlxc.cap.drop = sys_module mac_admin\nlxc.mount.auto = cgroup:mixed proc:mixed sys:ro\n\
             lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0\nlxc.mount.entry = /lib lib none ro,bind 0 0\n\
             lxc.mount.entry = /sys/kernel/security sys/kernel/security none ro,bind,optional 0 0\n\
             lxc.cgroup.memory.limit_in_bytes = 96M\nlxc.cgroup2.pids.max = 50\nlxc.include = /usr/share/lxc/config/common.conf\n",
        );
        assert_eq!(first_refused(&c), None);
    }

    #[test]
    fn what_acts_on_the_host_is_refused() {
        for (k, v) in [
            ("lxc.hook.pre-start", "/bin/sh -c id phaul-migrated-away"),
            ("lxc.hook.start-host", "/x"),
            ("lxc.net.0.script.up", "/x"),
            ("lxc.net.0.type", "phys"),
            ("lxc.net.0.type", "macvlan"),
            ("lxc.mount.entry", "/ host none rbind 0 0"),
            ("lxc.mount.entry", "/lib lib none bind 0 0"),
            ("lxc.mount.entry", "/lib ../../etc none ro,bind 0 0"),
            ("lxc.mount.entry", "/dev/sda1 mnt ext4 defaults 0 0"),
            ("lxc.mount.fstab", "/etc/fstab"),
            ("lxc.mount.auto", "sys:rw"),
            ("lxc.log.file", "/root/.ssh/authorized_keys"),
            ("lxc.console.logfile", "/etc/passwd"),
            ("lxc.console.path", "/dev/tty1"),
            ("lxc.namespace.keep", "net"),
            ("lxc.namespace.share.net", "1"),
            ("lxc.cgroup.devices.allow", "a"),
            ("lxc.cgroup.dir", "/"),
            ("lxc.sysctl.kernel.core_pattern", "|/x"),
            ("lxc.seccomp.profile", "/x"),
            ("lxc.include", "/usr/share/lxc/config/../../../tmp/x.conf"),
            ("lxc.include", "/etc/lxc/x.conf"),
            ("lxc.rootfs.mount", "/"),
        ] {
            assert!(refusal(k, v).is_some(), "{k} = {v} must be refused");
        }
    }
}
