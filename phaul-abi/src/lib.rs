//! # phaul-abi: what a phaul driver plugin is built against
//!
//! A plugin is a `cdylib` crate that depends on this crate only. It implements [`HostType`] (how to find, dump and
//! restore one kind of workload) or [`FsSender`] + [`FsReceiver`] (how its files reach the destination) in plain
//! Rust, then exports itself with one macro:
//!
//! ```ignore
//! struct MyHost { pid: i32 }
//! impl phaul_abi::HostType for MyHost {
//!     fn root_pid(&mut self) -> phaul_abi::PluginResult<i32> { Ok(self.pid) }
//! }
//! fn new(args: &phaul_abi::HostTypeArgs) -> phaul_abi::PluginResult<MyHost> { /* parse args.id */ }
//! phaul_abi::export_host_type!(name: "mine", description: "my containers", new: new);
//! ```
//!
//! The host checks, when it loads the library, that abi_stable's version, the layout of every type here and
//! [`PHAUL_ABI_VERSION`] match its own, and refuses the file with a message naming it otherwise. Every call into the
//! driver is wrapped so that a panic becomes an error instead of aborting the host.

mod drivers;
mod ffi;
mod types;

pub use drivers::{FsReceiver, FsSender, HostType};
pub use ffi::{
    guard, make_fs_receiver, make_fs_sender, make_host_type, not_a_host_type, not_an_fs_driver_receiver,
    not_an_fs_driver_sender, FsReceiverBox, FsReceiverFfi, FsSenderBox, FsSenderFfi, Guarded, HostTypeBox, HostTypeFfi,
    NewFsReceiverFn, NewFsSenderFn, NewHostTypeFn, PluginModule, PluginModuleRef, PHAUL_ABI_VERSION,
};
pub use types::*;

/// Re-exported so the export macros work in plugins that do not depend on abi_stable themselves.
pub use abi_stable;

/// The plugin's self-description (used by the export macros).
#[doc(hidden)]
#[macro_export]
macro_rules! __phaul_plugin_info {
    ($kind:ident, $name:expr, $desc:expr) => {
        extern "C" fn __phaul_plugin_info() -> $crate::PluginInfo {
            $crate::PluginInfo {
                kind: $crate::PluginKind::$kind,
                name: $name.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                description: $desc.into(),
            }
        }
    };
}

/// Exports a host-type plugin.
///
/// `new` is a `fn(&HostTypeArgs) -> PluginResult<T>` where `T: HostType`.
#[macro_export]
macro_rules! export_host_type {
    (name: $name:expr, description: $desc:expr, new: $ctor:path $(,)?) => {
        $crate::__phaul_plugin_info!(HostType, $name, $desc);

        extern "C" fn __phaul_new_host_type(
            args: &$crate::HostTypeArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::HostTypeBox, $crate::PluginError> {
            $crate::make_host_type(args, $ctor)
        }

        #[$crate::abi_stable::export_root_module]
        pub fn __phaul_root_module() -> $crate::PluginModuleRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginModule {
                abi_version: $crate::PHAUL_ABI_VERSION,
                info: __phaul_plugin_info,
                new_host_type: __phaul_new_host_type,
                new_fs_sender: $crate::not_an_fs_driver_sender,
                new_fs_receiver: $crate::not_an_fs_driver_receiver,
            }
            .leak_into_prefix()
        }
    };
}

/// Exports a filesystem-driver plugin.
///
/// `sender` and `receiver` are `fn(&FsArgs) -> PluginResult<T>` where `T: FsSender` and `T: FsReceiver`.
#[macro_export]
macro_rules! export_fs_driver {
    (name: $name:expr, description: $desc:expr, sender: $send:path, receiver: $recv:path $(,)?) => {
        $crate::__phaul_plugin_info!(FsDriver, $name, $desc);

        extern "C" fn __phaul_new_fs_sender(
            args: &$crate::FsArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::FsSenderBox, $crate::PluginError> {
            $crate::make_fs_sender(args, $send)
        }

        extern "C" fn __phaul_new_fs_receiver(
            args: &$crate::FsArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::FsReceiverBox, $crate::PluginError> {
            $crate::make_fs_receiver(args, $recv)
        }

        #[$crate::abi_stable::export_root_module]
        pub fn __phaul_root_module() -> $crate::PluginModuleRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginModule {
                abi_version: $crate::PHAUL_ABI_VERSION,
                info: __phaul_plugin_info,
                new_host_type: $crate::not_a_host_type,
                new_fs_sender: __phaul_new_fs_sender,
                new_fs_receiver: __phaul_new_fs_receiver,
            }
            .leak_into_prefix()
        }
    };
}
