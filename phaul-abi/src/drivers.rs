//! The traits driver authors implement, in plain Rust. Every method but a host type's `root_pid` has a default, so
//! a driver implements what its kind of workload or storage needs and nothing else.
//!
//! phaul calls a host type on the **source**: `root_pid`, `can_pre_dump`, `fs_roots`, `criu_options(PRE_DUMP)` per
//! pre-copy round, `criu_options(DUMP)`, `notify` for each of CRIU's notifications (before phaul answers CRIU),
//! `extra_files`, and finally `finish(outcome)`. In restart mode `stop` replaces the dump (and `start` brings the
//! workload back on the source if the migration fails before the destination started it).
//!
//! On the **destination**: `install_extra_files`, `mount_root` (with what the filesystem driver prepared),
//! `criu_options(RESTORE)`, then either phaul's own restore (`notify` for each notification) or, when
//! `restores_itself`, `restore`; `discard` if the restored copy must go; `finish(outcome)`, which must undo
//! `mount_root` when the outcome is `ROLLED_BACK`. In restart mode `start` replaces the restore.
//!
//! A filesystem driver's sender and receiver go through numbered rounds (`round` / `wait_round`), the last one
//! marked final and run while the workload is frozen; the receiver then says what it `prepared` for the host type.

use crate::options::CriuOptions;
use crate::types::{
    CriuStage, ExtraFile, FsRound, FsRoundInfo, KeyValue, Notification, Outcome, PluginError, PluginResult,
    RestoreRequest,
};

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

    /// Directories that hold the workload's files, handed to the filesystem driver (source).
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
    /// `prepared` is what the filesystem driver's receiver prepared (`root`, `device`, `root-map` = `SRC=DST`...).
    fn mount_root(&mut self, _prepared: &[KeyValue]) -> PluginResult<Option<String>> {
        Ok(None)
    }

    /// One of CRIU's notifications, on either side, before phaul acts on it and answers CRIU. An error fails the
    /// step (before the commit: the migration rolls back).
    fn notify(&mut self, _n: &Notification) -> PluginResult<()> {
        Ok(())
    }

    /// Whether this host type restores the workload itself ([`HostType::restore`]) instead of phaul asking CRIU.
    fn restores_itself(&self) -> bool {
        false
    }

    /// Restores the workload from `req.images_dir` through the host type's own manager, running CRIU with
    /// `req.action_script`; returns the restored root pid once the restore returned (destination).
    fn restore(&mut self, _req: &RestoreRequest) -> PluginResult<i32> {
        Err(PluginError::unsupported("this host type does not restore by itself"))
    }

    /// Whether this kind of workload can be stopped and started (restart mode).
    fn can_restart(&self) -> bool {
        false
    }

    /// Restart mode: stops the workload (source).
    fn stop(&mut self) -> PluginResult<()> {
        Err(PluginError::unsupported("this host type cannot be stopped for restart mode"))
    }

    /// Restart mode: starts the workload and returns its root pid (destination; on the source, to bring it back
    /// after a failure).
    fn start(&mut self) -> PluginResult<i32> {
        Err(PluginError::unsupported("this host type cannot be started for restart mode"))
    }

    /// The migration is over. On the destination, `ROLLED_BACK` must undo whatever `mount_root` did.
    fn finish(&mut self, _outcome: Outcome) -> PluginResult<()> {
        Ok(())
    }

    /// Interface revision 3. The restored copy rooted at `pid` must go (a roll-back on the destination): end it
    /// the way its manager ends such a workload and wait until every process of it is gone. `Ok(false)`: the host
    /// type leaves it to phaul, which kills the tree by pid.
    fn discard(&mut self, _pid: i32) -> PluginResult<bool> {
        Ok(false)
    }

    /// Interface revision 3. What the migration's report says of the workload, asked of the
    /// source after `finish`: `key = value` lines such as the container, where its root filesystem was and how
    /// its console was carried.
    fn report(&mut self) -> PluginResult<Vec<KeyValue>> {
        Ok(Vec::new())
    }
}

/// The sending half of a filesystem driver, on the source.
pub trait FsSender: Send + 'static {
    /// Starts the migration of the roots given at creation.
    fn start(&mut self) -> PluginResult<()> {
        Ok(())
    }

    /// One round. Rounds before the final one run while the workload runs and may take as long as they need; the
    /// final one runs while it is frozen, after CRIU's post-dump: after it the destination must have every file.
    fn round(&mut self, _info: &FsRoundInfo) -> PluginResult<FsRound> {
        Ok(FsRound::moved(0, 0))
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

    /// Blocks until the source's round `info.number` has been fully received.
    fn wait_round(&mut self, _info: &FsRoundInfo) -> PluginResult<FsRound> {
        Ok(FsRound::moved(0, 0))
    }

    /// After the final round: what the receiver prepared for the host type's `mount_root` (`root` = a mounted
    /// root, `device` = a block device, `root-map` = `SOURCE-PATH=DESTINATION-PATH`, repeated...).
    fn prepared(&mut self) -> PluginResult<Vec<KeyValue>> {
        Ok(Vec::new())
    }

    /// The migration is over; on `ROLLED_BACK` the driver removes what it received.
    fn finish(&mut self, _outcome: Outcome) -> PluginResult<()> {
        Ok(())
    }
}
