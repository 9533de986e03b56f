//! Driving CRIU: finding the binary, its RPC (`criu swrk`), and the options phaul hands it.

mod locate;
mod log;
mod options;
pub mod rpc;

pub use locate::{locate_criu, CriuLocation, LocateError, MIN_CRIU, SETUP_DEFAULT_CRIU};
pub use log::error_lines;
pub use options::{build_opts, command_line_args, network_lock_method, PassedFds, INHERIT_FD_BASE};
pub use rpc::{Criu, CriuBackend, CriuError, CriuSession, Features, NotifyHandler, SwrkSession, Version};

#[cfg(test)]
pub mod fake;
