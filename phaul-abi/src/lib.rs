//! # phaul-abi: what a phaul driver plugin is built against
//!
//! A plugin is a `cdylib` crate that depends on this crate (and `log`, if it logs). It implements [`HostType`] (how
//! to find, dump and restore one kind of workload) and/or [`FsSender`] + [`FsReceiver`] (how its files reach the
//! destination) in plain Rust, then exports its drivers with one macro; one library may carry several:
//!
//! ```ignore
//! struct MyHost { pid: i32 }
//! impl phaul_abi::HostType for MyHost {
//!     fn root_pid(&mut self) -> phaul_abi::PluginResult<i32> { Ok(self.pid) }
//! }
//! fn new(args: &phaul_abi::HostTypeArgs) -> phaul_abi::PluginResult<MyHost> { /* parse args.id */ }
//! phaul_abi::export_plugin! {
//!     host_type { name: "mine", description: "my containers", new: new }
//! }
//! ```
//!
//! When it loads a library the host checks the layout of every type here (with abi_stable's checker, accepting
//! prefix types that lack fields added after the library was built) and that the library's interface revision is
//! within the range it supports ([`PHAUL_ABI_OLDEST`] to [`PHAUL_ABI_VERSION`]); it refuses the file with a
//! message naming it and both revisions otherwise. Every call into the driver is wrapped so that
//! a panic becomes an error instead of aborting the host. How the interface may grow without breaking plugins
//! built before: `docs/plugins.md`.

mod drivers;
mod ffi;
mod host;
mod options;
mod types;

pub use drivers::{FsReceiver, FsSender, HostType};
pub use ffi::{
    driver_info, guard, make_fs_receiver, make_fs_sender, make_host_type, no_such_driver, plain_services, FsArgs,
    FsReceiverBox, FsReceiverFfi, FsSenderBox, FsSenderFfi, Guarded, HostServices, HostServicesRef, HostTypeArgs,
    HostTypeBox, HostTypeFfi, NewFsReceiverFn, NewFsSenderFn, NewHostTypeFn, PluginModule, PluginModuleRef,
    PHAUL_ABI_OLDEST, PHAUL_ABI_VERSION,
};
pub use host::{install_logger, Host};
pub use options::{CgroupMode, CriuOptions, NetworkLock};
pub use types::*;

/// Re-exported so the export macros work in plugins that do not depend on abi_stable themselves.
pub use abi_stable;

/// Exports a plugin library: its host types first, then its filesystem drivers, any number of each.
///
/// `new` is a `fn(&HostTypeArgs) -> PluginResult<T>` where `T: HostType`; `sender` and `receiver` are
/// `fn(&FsArgs) -> PluginResult<T>` where `T: FsSender` and `T: FsReceiver`.
#[macro_export]
macro_rules! export_plugin {
    (
        $( host_type { name: $hname:expr, description: $hdesc:expr, new: $hnew:path $(,)? } )*
        $( fs_driver { name: $fname:expr, description: $fdesc:expr, sender: $fsend:path, receiver: $frecv:path $(,)? } )*
    ) => {
        extern "C" fn __phaul_drivers() -> $crate::abi_stable::std_types::RVec<$crate::PluginInfo> {
            let mut v = ::std::vec::Vec::new();
            $( v.push($crate::driver_info($crate::PluginKind::HOST_TYPE, $hname, env!("CARGO_PKG_VERSION"), $hdesc)); )*
            $( v.push($crate::driver_info($crate::PluginKind::FS_DRIVER, $fname, env!("CARGO_PKG_VERSION"), $fdesc)); )*
            v.into()
        }

        #[allow(unused_variables)]
        extern "C" fn __phaul_new_host_type(
            name: $crate::abi_stable::std_types::RStr<'_>,
            args: &$crate::HostTypeArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::HostTypeBox, $crate::PluginError> {
            $crate::install_logger(args.host, env!("CARGO_PKG_NAME"));
            $( if name.as_str() == $hname { return $crate::make_host_type(args, $hnew); } )*
            $crate::no_such_driver($crate::PluginKind::HOST_TYPE, name)
        }

        #[allow(unused_variables)]
        extern "C" fn __phaul_new_fs_sender(
            name: $crate::abi_stable::std_types::RStr<'_>,
            args: &$crate::FsArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::FsSenderBox, $crate::PluginError> {
            $crate::install_logger(args.host, env!("CARGO_PKG_NAME"));
            $( if name.as_str() == $fname { return $crate::make_fs_sender(args, $fsend); } )*
            $crate::no_such_driver($crate::PluginKind::FS_DRIVER, name)
        }

        #[allow(unused_variables)]
        extern "C" fn __phaul_new_fs_receiver(
            name: $crate::abi_stable::std_types::RStr<'_>,
            args: &$crate::FsArgs,
        ) -> $crate::abi_stable::std_types::RResult<$crate::FsReceiverBox, $crate::PluginError> {
            $crate::install_logger(args.host, env!("CARGO_PKG_NAME"));
            $( if name.as_str() == $fname { return $crate::make_fs_receiver(args, $frecv); } )*
            $crate::no_such_driver($crate::PluginKind::FS_DRIVER, name)
        }

        #[$crate::abi_stable::export_root_module]
        pub fn __phaul_root_module() -> $crate::PluginModuleRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginModule {
                abi_version: $crate::PHAUL_ABI_VERSION,
                drivers: __phaul_drivers,
                new_host_type: __phaul_new_host_type,
                new_fs_sender: __phaul_new_fs_sender,
                new_fs_receiver: __phaul_new_fs_receiver,
            }
            .leak_into_prefix()
        }
    };
}

/// Exports a library with one host type (shorthand for [`export_plugin!`]).
#[macro_export]
macro_rules! export_host_type {
    (name: $name:expr, description: $desc:expr, new: $ctor:path $(,)?) => {
        $crate::export_plugin! { host_type { name: $name, description: $desc, new: $ctor } }
    };
}

/// Exports a library with one filesystem driver (shorthand for [`export_plugin!`]).
#[macro_export]
macro_rules! export_fs_driver {
    (name: $name:expr, description: $desc:expr, sender: $send:path, receiver: $recv:path $(,)?) => {
        $crate::export_plugin! { fs_driver { name: $name, description: $desc, sender: $send, receiver: $recv } }
    };
}
