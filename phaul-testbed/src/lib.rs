//! End-to-end test harness for phaul.
//!
//! Two "hosts" are two network namespaces joined by a veth pair ([`HostPair`]); programs run inside a
//! host through `nsenter --net` ([`Host::command`]) so that they stay in the caller's mount namespace,
//! which CRIU needs. [`HostPair::connect_tcp`] makes real TCP connections over the veth to hand to phaul as
//! channels ([`spawn_with_fds`] maps them to fixed fd numbers), and [`Workload`] starts a
//! `phaul-workload` inside a host and observes it through its state file.
//!
//! Everything here needs root ([`require_root`]). Every wait is bounded by a timeout.
//!
//! A migration test looks roughly like this (`phaul` is built by the workspace):
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use std::time::Duration;
//! use phaul_testbed::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! require_root()?;
//! become_subreaper()?;
//! let pair = HostPair::new("demo")?;
//! let dir = tempfile::tempdir()?;
//! let w = Workload::start(pair.a(), &locate_binary("phaul-workload")?, "counter", &[], dir.path())?;
//! state_ok(&w.probe(PROBE_TIMEOUT)?)?;
//! let ch = pair.channel_triple()?;
//! let pid = w.pid().to_string();
//! let src = pair.a().command(locate_binary("phaul")?, ["migrate", "pid", &pid, "--fdrpc", "3", "--fdmem", "4", "--fdfs", "5"]);
//! let mut src = spawn_with_fds(src, &[(ch.rpc.0.as_fd(), 3), (ch.mem.0.as_fd(), 4), (ch.fs.0.as_fd(), 5)])?;
//! // ... start the receiving side in host B with the `.1` ends, wait for both (bounded) ...
//! assert!(wait_pid_gone(w.pid(), Duration::from_secs(30)));
//! let restored = pids_in_netns(pair.b().netns_inode()?)?;
//! # let _ = (&mut src, restored);
//! # Ok(())
//! # }
//! ```

mod binary;
mod cmd;
mod error;
pub mod fault;
pub mod lxc;
mod migration;
mod netns;
mod process;
mod spawn;
pub mod storage;
pub mod tree;
mod workload;

pub use binary::locate_binary;
pub use cmd::{describe_command, run_command, COMMAND_TIMEOUT};
pub use error::TestbedError;
pub use migration::{
    collect, collect_every, run_collect, write_plugins_toml, Collected, Lab, MigrateOptions, MigrationRun, ProcUsage,
    RunningPids, ScratchDir, MIGRATION_TIMEOUT, PLUGIN_FILES,
};
pub use netns::{
    socket_netns_inode, ChannelTriple, CutKind, Host, HostPair, LinkCut, ADDR_A, ADDR_B, BLACKHOLE_TABLE, PREFIX_LEN,
};
pub use process::{
    become_subreaper, netns_of_pid, ns_pids, pid_alive, pids_in_netns, proc_stat, reap_pid, require_root,
    wait_pid_gone, ProcStat,
};
pub use spawn::spawn_with_fds;
pub use workload::{probe_state_dir, read_state, state_ok, Workload, PROBE_TIMEOUT, START_TIMEOUT};
