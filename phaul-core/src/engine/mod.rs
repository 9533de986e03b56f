//! The iteration engine: the source side (`phaul migrate`) and the destination side (`phaul serve`).
//!
//! docs/protocol.md has the conversation between them as a sequence diagram.

mod control;
mod destination;
pub(crate) mod fault;
mod files;
pub mod guard;
pub mod lazy;
mod policy;
pub mod preflight;
mod progress;
mod report;
pub mod resolve;
pub mod server;
mod source;
#[cfg(test)]
mod tests;

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

pub use destination::{
    answer_resolution, kill_restored_tree, run_notify_helper, serve_session, DestinationChannels, DestinationConfig,
    DestinationContext, ServeError, ServeSummary,
};
pub use files::FileTransferError;
pub use policy::{rates, should_stop, OnNoConverge, Policy, Rates, RoundSample, StopReason};
pub use progress::{Phase, Progress, StatusSink, STATUS_SCHEMA};
pub use report::{ChannelBytes, HandoverReport, MemoryStrategy, Report, RoundReport};
pub use source::{
    migrate, Ended, Guard, GuardSpawner, HandoverOrder, MigrateError, PreDump, SourceChannels, SourceConfig,
    SourceContext,
};

/// Default `--max-frozen`: the longest a workload stays frozen before the point of no return.
pub const DEFAULT_MAX_FROZEN_SECS: u64 = 60;
/// Default `--resolve-timeout`: after the point of no return, how long phaul tries to learn the outcome.
pub const DEFAULT_RESOLVE_TIMEOUT_SECS: u64 = 60;
/// Default `--link-timeout`: a dead peer or cut link is noticed within about this many seconds.
pub const DEFAULT_LINK_TIMEOUT_SECS: u32 = 10;

/// Where images go when `--img-path` is not given. Images hold the workload's memory, so directories are 0700.
pub const DEFAULT_IMG_PATH: &str = "/var/lib/phaul/images";

/// Default bound on any single wait for the peer or for CRIU.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

/// Creates `dir` (and its parents) readable only by its owner.
pub(crate) fn private_dir(dir: &Path, parents: bool) -> io::Result<()> {
    DirBuilder::new().recursive(parents).mode(0o700).create(dir)
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map(|v| v as u64).unwrap_or(4096)
}

/// Turns an operator-given id into something safe inside a directory name.
/// Checks a name that a source sends and a destination turns into part of a path or a lookup (host type, driver,
/// container id, restored-pid file): `[A-Za-z0-9._-]`, 1 to 64 bytes, not `.` or `..`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        return Ok(());
    }
    Err(format!(
        "the {what} {:?} is not a plain name ([A-Za-z0-9._-], 1 to 64 characters): names the source sends become file names on the destination, which refuses anything else",
        name.chars().take(80).collect::<String>()
    ))
}

pub(crate) fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect()
}
