//! An example phaul plugin: one library exporting two drivers.
//!
//! - `example`, a host type: the workload is a process tree named by the pid of its root (as phaul's own `pid`
//!   host type does it, without its checks). A real host type for a container manager would find the container's
//!   init here, ask for the CRIU options the container needs, and carry its configuration (see `docs/plugins.md`).
//! - `example-fs`, a filesystem driver for storage both hosts already see: nothing is copied, but each round
//!   reports progress, as a driver that copies would.
//!
//! Every method of the traits but `HostType::root_pid` has a default, so a driver implements only what it needs.

use phaul_abi::{
    CriuOptions, CriuStage, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, Host, HostType, HostTypeArgs, Outcome,
    PluginError, PluginResult, Role,
};

/// The name this library's log lines and progress reports carry.
const PLUGIN: &str = env!("CARGO_PKG_NAME");

pub struct Example {
    pid: i32,
    role: Role,
}

/// Called by phaul on each side of a migration: `args.id` is what the operator named (`phaul migrate example 4242`).
pub fn new_host_type(args: &HostTypeArgs) -> PluginResult<Example> {
    if let Some(kv) = args.options.first() {
        // Unknown `--htype-opt` keys: say which, so the operator can fix the command line.
        return Err(PluginError::invalid(format!("the example host type takes no options, but got '{}'", kv.key)));
    }
    let pid = args
        .id
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| PluginError::invalid(format!("'{}' is not a pid", args.id)))?;
    log::info!("example host type on the {} side for pid {pid}", args.role);
    Ok(Example { pid, role: args.role })
}

impl HostType for Example {
    fn root_pid(&mut self) -> PluginResult<i32> {
        if self.role != Role::SOURCE {
            return Err(PluginError::invalid("root_pid is asked of the source only"));
        }
        if !std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
            return Err(PluginError::not_found(format!("no process with pid {} exists on this host", self.pid)));
        }
        Ok(self.pid)
    }

    fn criu_options(&mut self, _stage: CriuStage) -> PluginResult<CriuOptions> {
        Ok(CriuOptions { tcp_established: true, file_locks: true, link_remap: true, ..Default::default() })
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        log::info!("example host type: the migration ended {outcome}");
        Ok(())
    }
}

pub struct ExampleFs {
    host: Host,
}

/// Both halves of the filesystem driver (the source's sender, the destination's receiver).
pub fn new_fs(args: &FsArgs) -> PluginResult<ExampleFs> {
    if let Some(kv) = args.options.first() {
        return Err(PluginError::invalid(format!("example-fs takes no options, but got '{}'", kv.key)));
    }
    Ok(ExampleFs { host: Host::new(args.host, PLUGIN) })
}

impl ExampleFs {
    fn round(&self, info: &FsRoundInfo) -> FsRound {
        // A host older than the progress service would not have it; `Host::progress` asks `has("progress")`
        // itself. A service added later than the one a plugin needs must be asked for the same way.
        // Rounds done, of a total known only once the final round came.
        let total = if info.is_final { u64::from(info.number) } else { 0 };
        self.host.progress("example-fs rounds", u64::from(info.number), total);
        FsRound::moved(0, 0)
    }
}

impl FsSender for ExampleFs {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        Ok(ExampleFs::round(self, info))
    }

    fn shares_storage(&self) -> bool {
        true
    }
}

impl FsReceiver for ExampleFs {
    fn wait_round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        Ok(ExampleFs::round(self, info))
    }
}

phaul_abi::export_plugin! {
    host_type { name: "example", description: "example host type: a process tree named by its root pid", new: new_host_type }
    fs_driver { name: "example-fs", description: "example filesystem driver: shared storage", sender: new_fs, receiver: new_fs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phaul_abi::{abi_stable::std_types::RVec, plain_services, KeyValue, Mode};

    fn args(id: &str, options: Vec<KeyValue>) -> HostTypeArgs {
        HostTypeArgs {
            role: Role::SOURCE,
            mode: Mode::LIVE,
            id: id.into(),
            options: RVec::from(options),
            work_dir: "/tmp".into(),
            // Log lines to standard error, progress dropped: a host for tests.
            host: plain_services(),
            more: RVec::new(),
        }
    }

    #[test]
    fn finds_its_own_process() {
        let me = std::process::id().to_string();
        let mut ht = new_host_type(&args(&me, vec![])).expect("constructed");
        assert_eq!(ht.root_pid().expect("root pid"), std::process::id() as i32);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert!(new_host_type(&args("twelve", vec![])).is_err());
        assert!(new_host_type(&args("1", vec![KeyValue::new("speed", "11")])).is_err());
    }
}
