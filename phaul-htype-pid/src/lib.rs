//! The `pid` host type: a plain process tree, named by the pid of its root.
//!
//! Options (`--htype-opt KEY=VALUE`):
//! - `tcp-established=yes|no` (yes): migrate established TCP connections (CRIU's TCP repair);
//! - `ext-unix-sk=yes|no` (no): allow unix sockets connected to processes outside the tree;
//! - `file-locks=yes|no` (yes): carry file locks;
//! - `shell-job=yes|no` (no): the tree is not a session leader and belongs to the caller's session;
//! - `skip-in-flight=yes|no` (yes): skip half-open TCP connections (their clients retransmit their SYN) instead of
//!   failing the dump, so a server accepting connections throughout can be migrated;
//! - `require-pidns=yes|no` (yes): insist that the root is the init of its own pid namespace. CRIU restores every
//!   process with its original pid; when source and destination share a kernel (as in tests) or the pids are taken
//!   on the destination, only a tree in its own pid namespace can get them back. Set `no` between two real
//!   machines when you know the pids are free on the destination.
//! - `root=DIR`: the directory that holds the tree's files, handed to the filesystem driver (rsync, btrfs, zfs
//!   ...), which moves it to the destination; without it the tree has no files to move (the `shared` driver).

use phaul_abi::{option, CriuOptions, CriuStage, HostType, HostTypeArgs, PluginError, PluginResult, Role};

const KNOWN: &[&str] =
    &["tcp-established", "ext-unix-sk", "file-locks", "shell-job", "require-pidns", "skip-in-flight", "root"];

struct PidTree {
    pid: i32,
    role: Role,
    tcp_established: bool,
    ext_unix_sk: bool,
    file_locks: bool,
    shell_job: bool,
    require_pidns: bool,
    skip_in_flight: bool,
    root: Option<String>,
}

fn yes_no(args: &HostTypeArgs, key: &str, default: bool) -> PluginResult<bool> {
    match option(&args.options, key) {
        None => Ok(default),
        Some("yes" | "true" | "1" | "on") => Ok(true),
        Some("no" | "false" | "0" | "off") => Ok(false),
        Some(other) => Err(PluginError::invalid(format!("--htype-opt {key}={other}: the value must be yes or no"))),
    }
}

fn new(args: &HostTypeArgs) -> PluginResult<PidTree> {
    if let Some(kv) = args.options.iter().find(|kv| !KNOWN.contains(&kv.key.as_str())) {
        return Err(PluginError::invalid(format!(
            "the pid host type has no option '{}'; it knows {}",
            kv.key,
            KNOWN.join(", ")
        )));
    }
    let pid: i32 = args.id.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        PluginError::invalid(format!(
            "'{}' is not a pid: the pid host type needs the numeric pid of the tree's root",
            args.id
        ))
    })?;
    Ok(PidTree {
        pid,
        role: args.role,
        tcp_established: yes_no(args, "tcp-established", true)?,
        ext_unix_sk: yes_no(args, "ext-unix-sk", false)?,
        file_locks: yes_no(args, "file-locks", true)?,
        shell_job: yes_no(args, "shell-job", false)?,
        require_pidns: yes_no(args, "require-pidns", true)?,
        skip_in_flight: yes_no(args, "skip-in-flight", true)?,
        root: match option(&args.options, "root") {
            None => None,
            Some(r) if args.role == Role::SOURCE => {
                let p = std::path::Path::new(r);
                if !p.is_absolute() || !p.is_dir() {
                    return Err(PluginError::invalid(format!(
                        "--htype-opt root={r}: give the absolute path of an existing directory"
                    )));
                }
                Some(r.trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).or(Some("/".into()))
            }
            Some(r) => Some(r.to_string()),
        },
    })
}

/// The `NSpid:` line of /proc/PID/status: the pid in each nested pid namespace, outermost first.
fn ns_pids(status: &str) -> Vec<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|rest| rest.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default()
}

/// Session id of a process (field 6 of /proc/PID/stat).
fn session_of(stat: &str) -> Option<i64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(3).and_then(|v| v.parse().ok())
}

impl PidTree {
    fn check_root(&self) -> PluginResult<()> {
        let pid = self.pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| {
            PluginError::not_found(format!("no process with pid {pid} exists on this host (it may have exited)"))
        })?;
        if status.lines().any(|l| l.starts_with("State:") && l.contains("Z (zombie)")) {
            return Err(PluginError::not_found(format!("pid {pid} is a zombie: the process has already exited")));
        }
        let nspids = ns_pids(&status);
        let is_ns_init = nspids.len() >= 2 && nspids.last() == Some(&1);
        if self.require_pidns && !is_ns_init {
            return Err(PluginError::invalid(format!(
                "pid {pid} is not the init of its own pid namespace. CRIU restores every process with its original \
                 pid, and until the destination confirms the restore the source tree still holds those pids; only a \
                 tree that is pid 1 of its own namespace can get its pids back. Start the workload with \
                 `unshare --pid --fork` (without --kill-child: a parent-death signal is restored too and would fire when the restoring CRIU exits), or in a container, or pass --htype-opt require-pidns=no \
                 between two machines whose pids do not collide"
            )));
        }
        if !self.shell_job {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_err(|_| PluginError::not_found(format!("no process with pid {pid} exists on this host")))?;
            // In its own namespace the init's session id reads 0 when the session leader is outside it.
            let sid = session_of(&stat);
            let leader =
                if is_ns_init { sid == Some(nspids[0]) || sid == Some(pid as i64) } else { sid == Some(pid as i64) };
            if !leader {
                return Err(PluginError::invalid(format!(
                    "pid {pid} is not a session leader, so its session belongs to a process outside the tree; start \
                     it with setsid, or pass --htype-opt shell-job=yes to let CRIU treat it as a shell job"
                )));
            }
        }
        Ok(())
    }
}

impl HostType for PidTree {
    fn root_pid(&mut self) -> PluginResult<i32> {
        if self.role != Role::SOURCE {
            return Err(PluginError::invalid("root_pid is asked of the source only"));
        }
        self.check_root()?;
        Ok(self.pid)
    }

    fn fs_roots(&mut self) -> PluginResult<Vec<String>> {
        Ok(self.root.iter().cloned().collect())
    }

    fn criu_options(&mut self, _stage: CriuStage) -> PluginResult<CriuOptions> {
        Ok(CriuOptions {
            tcp_established: self.tcp_established,
            ext_unix_sk: self.ext_unix_sk,
            file_locks: self.file_locks,
            shell_job: self.shell_job,
            tcp_skip_in_flight: self.skip_in_flight,
            link_remap: true,
            ..Default::default()
        })
    }
}

phaul_abi::export_host_type!(
    name: "pid",
    description: "a process tree named by its root pid (the init of its own pid namespace)",
    new: new,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nspid_and_session() {
        assert_eq!(ns_pids("Name:\tx\nNSpid:\t4242\t1\n"), vec![4242, 1]);
        assert_eq!(ns_pids("Name:\tx\n"), Vec::<i64>::new());
        assert_eq!(session_of("12 (a b) S 1 12 12 0 -1"), Some(12));
    }
}
