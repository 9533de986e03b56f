//! Spawning a command with descriptors mapped to fixed numbers.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::process::{Child, Command};

use command_fds::{CommandFdExt, FdMapping};

/// Spawn `cmd` with each `(parent fd, child fd number)` of `fds` available in the child under that number
/// (without close-on-exec), e.g. `[(rpc, 3), (mem, 4), (fs, 5)]` for
/// `phaul migrate ... --fdrpc 3 --fdmem 4 --fdfs 5`. The parent's descriptors are duplicated, so they stay
/// open and owned by the caller; the duplicates are closed in the parent once the child is spawned.
pub fn spawn_with_fds(mut cmd: Command, fds: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<Child> {
    let mappings = fds
        .iter()
        .map(|(fd, child_fd)| Ok(FdMapping { parent_fd: fd.try_clone_to_owned()?, child_fd: *child_fd }))
        .collect::<io::Result<Vec<_>>>()?;
    cmd.fd_mappings(mappings).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let child = cmd.spawn();
    // Dropping `cmd` closes the parent's duplicates.
    drop(cmd);
    child
}
