//! Plain data that crosses the plugin boundary.
//!
//! Every type here is `#[repr(C)]` and derives `StableAbi`, so the loader can check at load time that the plugin was
//! built against the same layout as the host.

use abi_stable::std_types::{ROption, RString, RVec};
use abi_stable::StableAbi;

/// What a plugin provides.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// A host type: how to find, freeze, dump and restore one kind of workload (a process tree, an LXC container...).
    HostType,
    /// A filesystem-migration driver: how the workload's files get to the destination.
    FsDriver,
}

impl PluginKind {
    /// The word used for this kind in `plugins.toml`, on the command line and in `phaul plugins`.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::HostType => "htype",
            PluginKind::FsDriver => "fs",
        }
    }
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginInfo {
    pub kind: PluginKind,
    /// The name operators use to pick it (`pid`, `lxc`, `shared`, `zfs`...). Unique among loaded plugins.
    pub name: RString,
    /// The plugin crate's own version.
    pub version: RString,
    /// One line for `phaul plugins`.
    pub description: RString,
}

/// Which end of a migration a driver instance serves.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

/// How a migration ended, told to drivers so they can clean up.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The workload runs on the destination; the source copy is gone.
    Migrated,
    /// The migration failed or was aborted; the workload keeps running on the source.
    RolledBack,
}

/// A `key=value` option given with `--htype-opt` or `--fs-opt`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: RString,
    pub value: RString,
}

/// The class of a plugin failure; the message says the rest.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operator gave something the driver cannot use (an unknown option, a bad id...).
    InvalidInput,
    /// The thing to migrate, or something it needs, does not exist.
    NotFound,
    /// The driver cannot do what was asked (for example a caller answered "unsupported").
    Unsupported,
    /// The operation was attempted and failed.
    Failed,
    /// The plugin panicked; the panic was caught at the boundary.
    Panicked,
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
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
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

/// How CRIU should treat cgroups (CRIU's `--manage-cgroups` modes).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupMode {
    /// Leave CRIU's own default.
    #[default]
    CriuDefault,
    Ignore,
    None,
    Props,
    Soft,
    Full,
    Strict,
}

/// How CRIU locks the network while the tree is frozen.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkLock {
    /// Let phaul choose (nftables: it needs no external binary).
    #[default]
    Auto,
    Iptables,
    Nftables,
    /// CRIU does not lock; the host type does it from its `net_lock` hook.
    Skip,
}

/// A cgroup root mapping (CRIU's `--cgroup-root [controller:]path`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    pub controller: ROption<RString>,
    pub path: RString,
}

/// A file descriptor the host hands to CRIU for restore (CRIU's `--inherit-fd fd[N]:KEY`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct InheritFd {
    pub key: RString,
    pub fd: i32,
}

/// CRIU options a host type adds to the ones phaul sets itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default)]
pub struct CriuOptions {
    pub shell_job: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub link_remap: bool,
    pub evasive_devices: bool,
    pub orphan_pts_master: bool,
    pub mntns_compat_mode: bool,
    pub force_irmap: bool,
    /// Skip half-open ("in-flight") TCP connections instead of failing the dump (CRIU's `--skip-in-flight`):
    /// their clients retransmit their SYN.
    pub tcp_skip_in_flight: bool,
    pub manage_cgroups: CgroupMode,
    pub network_lock: NetworkLock,
    /// Root of the restored tree's mount namespace (restore only).
    pub root: ROption<RString>,
    /// A cgroup CRIU freezes instead of walking the tree with ptrace.
    pub freeze_cgroup: ROption<RString>,
    pub lsm_profile: ROption<RString>,
    /// CRIU's `--external` resources (`mnt[...]`, `veth[...]`, `tty[...]`, ...).
    pub external: RVec<RString>,
    pub skip_mnt: RVec<RString>,
    pub enable_fs: RVec<RString>,
    pub cgroup_roots: RVec<CgroupRoot>,
    pub inherit_fds: RVec<InheritFd>,
}

/// When a host type is asked for CRIU options.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriuStage {
    PreDump,
    Dump,
    Restore,
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

/// What a host-type factory is given.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct HostTypeArgs {
    pub role: Role,
    /// What the operator named: a pid, a container name...
    pub id: RString,
    pub options: RVec<KeyValue>,
    /// A private directory for this migration that the driver may use.
    pub work_dir: RString,
}

/// What a filesystem-driver factory is given.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FsArgs {
    pub role: Role,
    pub options: RVec<KeyValue>,
    /// The connected filesystem data channel (`--fdfs`), if there is one. The driver may read and write it but must
    /// not close it.
    pub data_fd: ROption<i32>,
    /// The directories the host type says hold the workload's files.
    pub roots: RVec<RString>,
    pub work_dir: RString,
}

/// What one filesystem round moved.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsRound {
    pub bytes: u64,
    pub files: u64,
}

/// Looks up an option by key.
pub fn option<'a>(options: &'a [KeyValue], key: &str) -> Option<&'a str> {
    options.iter().rev().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str())
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
