//! The traits driver authors implement, in plain Rust.
//!
//! phaul calls a host type's methods in this order on the **source**:
//! `root_pid`, `can_pre_dump`, `fs_roots`, `criu_options(PreDump)` per pre-copy round, `criu_options(Dump)`,
//! `net_lock` / `net_unlock` (from CRIU's notifications, only when the driver asked CRIU to skip its own lock),
//! `extra_files`, and finally `finish(outcome)`. In restart mode `stop` replaces the dump.
//!
//! On the **destination**: `install_extra_files`, `mount_root`, `criu_options(Restore)`, `setup_namespaces`,
//! `net_unlock`, `post_restore`, then `finish(outcome)`, which must undo `mount_root` when the outcome is
//! `RolledBack`. In restart mode `start` replaces the restore.

use crate::types::{CriuOptions, CriuStage, ExtraFile, FsRound, Outcome, PluginError, PluginResult};

/// How to migrate one kind of workload.
pub trait HostType: Send + 'static {
    /// The pid of the root of the tree to dump, as seen from the host running phaul (source only).
    fn root_pid(&mut self) -> PluginResult<i32>;

    /// Options this host type needs CRIU to use at a stage.
    fn criu_options(&mut self, _stage: CriuStage) -> PluginResult<CriuOptions> {
        Ok(CriuOptions::default())
    }

    /// Whether this kind of workload can be pre-dumped while it runs (false makes phaul use stop-and-copy).
    fn can_pre_dump(&self) -> bool {
        true
    }

    /// Directories that hold the workload's files, handed to the filesystem driver.
    fn fs_roots(&mut self) -> PluginResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// Files to carry to the destination beside the images (source).
    fn extra_files(&mut self) -> PluginResult<Vec<ExtraFile>> {
        Ok(Vec::new())
    }

    /// Where the carried files were put on the destination.
    fn install_extra_files(&mut self, _dir: &str) -> PluginResult<()> {
        Ok(())
    }

    /// Prepares the root the tree is restored into and returns it, or `None` to restore into `/` (destination).
    fn mount_root(&mut self) -> PluginResult<Option<String>> {
        Ok(None)
    }

    /// CRIU's `setup-namespaces` notification: the restored root exists with its namespaces (destination).
    fn setup_namespaces(&mut self, _pid: i32) -> PluginResult<()> {
        Ok(())
    }

    /// Blocks the workload's network traffic (CRIU's `network-lock` notification).
    fn net_lock(&mut self) -> PluginResult<()> {
        Ok(())
    }

    /// Lets the workload's traffic through again (CRIU's `network-unlock` notification).
    fn net_unlock(&mut self) -> PluginResult<()> {
        Ok(())
    }

    /// The tree is restored and about to resume (destination).
    fn post_restore(&mut self, _pid: i32) -> PluginResult<()> {
        Ok(())
    }

    /// Restart mode: stops the workload on the source.
    fn stop(&mut self) -> PluginResult<()> {
        Err(PluginError::unsupported("this host type cannot be stopped for restart mode"))
    }

    /// Restart mode: starts the workload on the destination and returns its root pid.
    fn start(&mut self) -> PluginResult<i32> {
        Err(PluginError::unsupported("this host type cannot be started for restart mode"))
    }

    /// The migration is over. On the destination, `RolledBack` must undo whatever `mount_root` did.
    fn finish(&mut self, _outcome: Outcome) -> PluginResult<()> {
        Ok(())
    }
}

/// The sending half of a filesystem driver, on the source.
pub trait FsSender: Send + 'static {
    /// Starts the migration of the roots given at creation.
    fn start(&mut self) -> PluginResult<()> {
        Ok(())
    }

    /// One more round while the workload still runs.
    fn next_round(&mut self) -> PluginResult<FsRound> {
        Ok(FsRound::default())
    }

    /// The last round, while the workload is frozen: after it the destination must have every file.
    fn final_round(&mut self) -> PluginResult<FsRound> {
        Ok(FsRound::default())
    }

    /// Whether inode numbers survive the move (when not, CRIU must resolve inotify watches by path).
    fn persistent_inodes(&self) -> bool {
        true
    }

    /// Whether both hosts see the very same files (so a restore beside the frozen source would meet what the
    /// source still holds: its file locks, unix socket files, FIFOs).
    fn shares_storage(&self) -> bool {
        false
    }

    /// The migration is over.
    fn finish(&mut self, _outcome: Outcome) -> PluginResult<()> {
        Ok(())
    }
}

/// The receiving half of a filesystem driver, on the destination.
pub trait FsReceiver: Send + 'static {
    /// Starts receiving; may return before the first round arrives.
    fn start(&mut self) -> PluginResult<()> {
        Ok(())
    }

    /// Blocks until the source's round `round` (1-based, counting the final one) has been fully received.
    fn wait_round(&mut self, _round: u32) -> PluginResult<FsRound> {
        Ok(FsRound::default())
    }

    /// The migration is over; on `RolledBack` the driver removes what it received.
    fn finish(&mut self, _outcome: Outcome) -> PluginResult<()> {
        Ok(())
    }
}
