use std::io;
use std::time::Duration;

/// Everything that can go wrong in the testbed. Messages are sentences naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The harness needs root (network namespaces, veths, setns, unshare).
    #[error(
        "the phaul testbed must run as root (it creates network namespaces and veth pairs), but the effective \
         uid is {euid}; run the tests as root, e.g. `sudo -E cargo test`"
    )]
    NotRoot {
        /// The effective uid found.
        euid: u32,
    },

    /// A command could not be started at all.
    #[error("could not start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// A command ran and failed.
    #[error("`{command}` failed ({status}); its stderr: {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },

    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed; its stderr so far: {stderr}")]
    CommandTimedOut {
        /// The command line.
        command: String,
        /// The bound that was exceeded.
        timeout: Duration,
        /// What it printed on stderr before being killed.
        stderr: String,
    },

    /// An I/O operation failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    /// A system call failed.
    #[error("{what} failed: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },

    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound that was exceeded.
        timeout: Duration,
    },

    /// A workload failed to start, died, or reported nonsense.
    #[error("workload {kind} (pid {pid}): {detail}")]
    Workload {
        /// The workload kind.
        kind: String,
        /// Its host pid (0 if unknown).
        pid: i32,
        /// What is wrong.
        detail: String,
    },

    /// A workspace binary is missing.
    #[error("binary `{name}` was not found (looked in: {searched}); build it first with `cargo build --workspace`")]
    BinaryNotFound {
        /// The binary's file name.
        name: String,
        /// The directories searched.
        searched: String,
    },

    /// An argument makes no sense.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl TestbedError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        TestbedError::Io { what: what.into(), source }
    }

    pub(crate) fn sys(what: impl Into<String>, source: nix::Error) -> Self {
        TestbedError::Sys { what: what.into(), source }
    }
}
