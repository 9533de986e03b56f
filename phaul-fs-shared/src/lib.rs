//! The `shared` filesystem driver: both hosts see the same files (NFS, a cluster filesystem, or, in phaul's tests,
//! one machine), so nothing is copied. Inode numbers are the same on both sides.

use phaul_abi::{FsArgs, FsReceiver, FsSender, PluginError, PluginResult};

struct Shared;

impl FsSender for Shared {
    fn shares_storage(&self) -> bool {
        true
    }
}
impl FsReceiver for Shared {}

fn refuse_options(args: &FsArgs) -> PluginResult<()> {
    match args.options.iter().find(|kv| !phaul_abi::is_peer_option(&kv.key)) {
        Some(kv) => {
            Err(PluginError::invalid(format!("the shared filesystem driver takes no options, but got '{}'", kv.key)))
        }
        None => Ok(()),
    }
}

fn sender(args: &FsArgs) -> PluginResult<Shared> {
    refuse_options(args).map(|()| Shared)
}

fn receiver(args: &FsArgs) -> PluginResult<Shared> {
    refuse_options(args).map(|()| Shared)
}

phaul_abi::export_fs_driver!(
    name: "shared",
    description: "storage both hosts already see; nothing is copied",
    sender: sender,
    receiver: receiver,
);
