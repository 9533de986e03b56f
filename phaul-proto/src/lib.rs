//! Generated protobuf types.
//!
//! - [`criu`]: CRIU's RPC requests and responses and its stats image entries;
//! - [`wire`]: phaul's source/destination protocol;
//! - [`external`]: the messages of the `external` filesystem driver.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant, clippy::enum_variant_names)]

pub mod criu {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}

pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/phaul.wire.rs"));
}

pub mod external {
    include!(concat!(env!("OUT_DIR"), "/phaul.external.rs"));
}

/// Version of [`wire`]; bumped on any incompatible change. Both sides refuse a peer with another version.
pub const PROTOCOL_VERSION: u32 = 2;

pub use prost::Message;
