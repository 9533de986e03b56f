//! Plain data that crosses the plugin boundary.
//!
//! Every type here is `#[repr(C)]` (or a transparent integer) and derives `StableAbi`, so the loader checks at load
//! time that the plugin was built against the same layout. These layouts never change (see the evolution rules in
//! `docs/plugins.md`): what a later interface revision adds travels in the `more` lists (`key = value`, looked up by
//! name; a side that does not know a key ignores it) or as new methods at the end of the driver traits; and the
//! "enums" are integer codes with named constants, so that a later revision can add a code without breaking a
//! plugin that does not know it.

use abi_stable::std_types::{RString, RVec};
use abi_stable::StableAbi;

macro_rules! codes {
    ($(#[$m:meta])* $name:ident { $($(#[$cm:meta])* $c:ident = $v:expr => $s:expr),+ $(,)? }) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u8);

        impl $name {
            $($(#[$cm])* pub const $c: $name = $name($v);)+

            /// The code's name (`unknown` for a code this revision does not know; `Debug` prints `unknown-N`).
            pub fn as_str(self) -> &'static str {
                match self.0 {
                    $($v => $s,)+
                    _ => "unknown",
                }
            }

            /// Whether this revision of the interface knows the code.
            pub fn is_known(self) -> bool {
                [$($v),+].contains(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                if self.is_known() {
                    f.write_str(self.as_str())
                } else {
                    write!(f, "unknown-{}", self.0)
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }
    };
}

codes! {
    /// What a driver is.
    PluginKind {
        /// How to find, freeze, dump and restore one kind of workload (a process tree, an LXC container...).
        HOST_TYPE = 1 => "htype",
        /// How the workload's files get to the destination.
        FS_DRIVER = 2 => "fs",
    }
}

codes! {
    /// Which end of a migration a driver instance serves.
    Role {
        SOURCE = 1 => "source",
        DESTINATION = 2 => "destination",
    }
}

codes! {
    /// How a migration ended, told to drivers so they can clean up.
    Outcome {
        /// The workload runs on the destination; the source copy is gone.
        MIGRATED = 1 => "migrated",
        /// The migration failed or was aborted; the workload keeps running on the source.
        ROLLED_BACK = 2 => "rolled-back",
    }
}

codes! {
    /// The class of a plugin failure; the message says the rest.
    ErrorKind {
        /// The operator gave something the driver cannot use (an unknown option, a bad id...).
        INVALID_INPUT = 1 => "invalid-input",
        /// The thing to migrate, or something it needs, does not exist.
        NOT_FOUND = 2 => "not-found",
        /// The driver cannot do what was asked.
        UNSUPPORTED = 3 => "unsupported",
        /// The operation was attempted and failed.
        FAILED = 4 => "failed",
        /// The plugin panicked; the panic was caught at the boundary.
        PANICKED = 5 => "panicked",
    }
}

codes! {
    /// When a host type is asked for CRIU options.
    CriuStage {
        PRE_DUMP = 1 => "pre-dump",
        DUMP = 2 => "dump",
        RESTORE = 3 => "restore",
    }
}

codes! {
    /// How the migration moves the workload.
    Mode {
        /// Checkpoint and restore (pre-copy, stop-and-copy, post-copy).
        LIVE = 1 => "live",
        /// Filesystem only: stop on the source, start on the destination.
        RESTART = 2 => "restart",
    }
}

/// A `key = value` pair: an operator's `--htype-opt`/`--fs-opt`, a CRIU option, or an argument a later revision
/// of the interface added.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: RString,
    pub value: RString,
}

impl KeyValue {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
        KeyValue { key: RString::from(key.into()), value: RString::from(value.into()) }
    }
}

/// On the destination, a filesystem receiver is configured by that host alone (`phaul serve --fs-opt
/// DRIVER:KEY=VALUE`); the options the source was given reach it only under this prefix (`peer.KEY`), as
/// information it may read but must never take for its own settings.
pub const PEER_OPTION_PREFIX: &str = "peer.";

/// Whether `key` is one of the source's options as a receiver sees them (see [`PEER_OPTION_PREFIX`]).
pub fn is_peer_option(key: &str) -> bool {
    key.starts_with(PEER_OPTION_PREFIX)
}

/// In a destination's [`crate::HostTypeArgs::more`] (interface revision 3 hosts from phaul 0.1 on): the index in
/// `options` from which the options are this host's own (`phaul serve --htype-opt NAME:KEY=VALUE`); those before
/// it are the source's. A host type that takes paths or names of this host from its options reads them from
/// [`own_options`] only, so that a source cannot pick them.
pub const OWN_OPTIONS_FROM: &str = "own-options-from";

/// A destination's own options (see [`OWN_OPTIONS_FROM`]): none when `more` does not say which they are (a host
/// that does not tell is not trusted to have separated them).
pub fn own_options<'a>(options: &'a [KeyValue], more: &[KeyValue]) -> &'a [KeyValue] {
    match option(more, OWN_OPTIONS_FROM).and_then(|v| v.parse::<usize>().ok()) {
        Some(from) => options.get(from..).unwrap_or(&[]),
        None => &[],
    }
}

#[cfg(test)]
mod own_option_tests {
    use super::*;

    #[test]
    fn own_options_are_those_from_the_index() {
        let opts = [KeyValue::new("lxcpath", "/src"), KeyValue::new("lxcpath", "/dst"), KeyValue::new("bridge", "br0")];
        let more = [KeyValue::new(OWN_OPTIONS_FROM, "1")];
        assert_eq!(own_options(&opts, &more), &opts[1..]);
        assert_eq!(own_options(&opts, &[KeyValue::new(OWN_OPTIONS_FROM, "3")]), &[] as &[KeyValue]);
        assert_eq!(own_options(&opts, &[KeyValue::new(OWN_OPTIONS_FROM, "9")]), &[] as &[KeyValue]);
        // A host that does not say: none are trusted as this host's.
        assert_eq!(own_options(&opts, &[]), &[] as &[KeyValue]);
    }
}

/// Looks up a key (the last one wins).
pub fn option<'a>(list: &'a [KeyValue], key: &str) -> Option<&'a str> {
    list.iter().rev().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str())
}

/// Every value of a repeated key, in order.
pub fn options<'a>(list: &'a [KeyValue], key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    list.iter().filter(move |kv| kv.key.as_str() == key).map(|kv| kv.value.as_str())
}

/// An error returned by a plugin. `message` is a sentence meant for the operator.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError { kind, message: RString::from(message.into()) }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_INPUT, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NOT_FOUND, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNSUPPORTED, message)
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FAILED, message)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

/// Result type used by the driver traits plugin authors implement.
pub type PluginResult<T> = Result<T, PluginError>;

/// What one driver of a library says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginInfo {
    pub kind: PluginKind,
    /// The name operators use to pick it (`pid`, `lxc`, `shared`, `zfs`...). Unique among loaded drivers.
    pub name: RString,
    /// The plugin crate's own version.
    pub version: RString,
    /// One line for `phaul plugins`.
    pub description: RString,
    /// More about the driver, by name (none defined yet).
    pub more: RVec<KeyValue>,
}

/// A file the source host type wants carried to the destination next to the images (a container's config, say).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// Where it is on the source.
    pub path: RString,
    /// The plain file name it gets in the destination's extra-files directory.
    pub name: RString,
}

/// One of CRIU's action-script notifications, forwarded to the host type before phaul answers CRIU.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Notification {
    /// CRIU's name for it: `pre-dump`, `post-dump`, `network-lock`, `network-unlock`, `pre-restore`,
    /// `setup-namespaces`, `post-setup-namespaces`, `post-restore`, `pre-resume`, `post-resume`,
    /// `orphan-pts-master`, and whatever a later CRIU adds.
    pub script: RString,
    /// The pid CRIU names (the restored root from `setup-namespaces` on), or 0.
    pub pid: i32,
    /// A descriptor CRIU handed over with it (`orphan-pts-master`: the pty master), or -1. It is open in this
    /// process until the call returns: duplicate it to keep it.
    pub fd: i32,
    /// More about it, by name (none defined yet).
    pub more: RVec<KeyValue>,
}

/// Which filesystem round this is.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FsRoundInfo {
    /// 1-based.
    pub number: u32,
    /// The last round, while the workload is frozen (after CRIU's post-dump, so link-remap files exist): after it
    /// the destination must have every file. Its time counts as frozen time.
    pub is_final: bool,
    /// More about the round, by name (none defined yet).
    pub more: RVec<KeyValue>,
}

/// What one filesystem round moved.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq, Eq)]
pub struct FsRound {
    pub bytes: u64,
    pub files: u64,
    /// What the driver expects a next round to move (bytes), for the stop policy; [`FsRound::UNKNOWN`] if it
    /// cannot tell.
    pub remaining_bytes: u64,
    /// More about the round, by name (none defined yet).
    pub more: RVec<KeyValue>,
}

impl FsRound {
    /// `remaining_bytes` when the driver cannot tell.
    pub const UNKNOWN: u64 = u64::MAX;

    /// A round that moved `bytes` in `files` files, with nothing known about what is left.
    pub fn moved(bytes: u64, files: u64) -> FsRound {
        FsRound { bytes, files, remaining_bytes: Self::UNKNOWN, more: RVec::new() }
    }
}

/// What the destination's host type is asked to restore by itself (a host type whose manager must own the
/// restored container: liblxc, vzctl).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RestoreRequest {
    /// The received images.
    pub images_dir: RString,
    /// The executable to pass to CRIU as its action script (`--action-script`): it carries CRIU's notifications to
    /// phaul, which holds the restored tree in post-restore until the commit, as with its own restores. A restore
    /// that runs CRIU without it cannot be committed and is refused.
    pub action_script: RString,
    /// The CRIU options phaul would use, as `criu restore` command-line arguments.
    pub criu_args: RVec<RString>,
    /// The same as a list (see [`crate::CriuOptions`] for the keys).
    pub criu_options: RVec<KeyValue>,
    /// More, by name (none defined yet).
    pub more: RVec<KeyValue>,
}

/// Duplicates a descriptor a driver was handed (the `--fdfs` data channel, or a caller's message fd), so the
/// driver owns its copy and never closes the original.
pub fn dup_fd(fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::BorrowedFd;
    if fd < 0 || std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("file descriptor {fd} is not open in this process"),
        ));
    }
    // SAFETY: the descriptor was just seen open in /proc/self/fd and the borrow ends within this statement, while
    // the caller (phaul or its caller) keeps it open for the whole migration.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}
