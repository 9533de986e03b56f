//! # phaul-core
//!
//! The engine of phaul, live migration of Linux process trees and containers with CRIU:
//!
//! - [`criu`]: finding CRIU and driving it over its RPC (`criu swrk`);
//! - [`images`]: reading CRIU's image files (stats);
//! - [`wire`]: phaul's own protocol between source and destination;
//! - [`transport`]: the connections (handed-in descriptors or phaul's own TCP);
//! - [`plugins`]: loading host-type and filesystem driver plugins;
//! - [`engine`]: the migration itself, source and destination sides;
//! - [`hold`]: holding the source's frozen copy by means that outlive CRIU and phaul;
//! - [`journal`]: each side's fsync'd record of a session's state.

pub mod criu;
pub mod engine;
pub mod hold;
pub mod images;
pub mod journal;
pub mod kept;
pub mod plugins;
pub mod sys;
pub mod transport;
pub mod wire;

pub use phaul_abi as abi;
pub use phaul_proto as proto;
