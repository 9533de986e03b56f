//! Putting back what CRIU's dump took from the tree's ptys.
//!
//! At the end of a dump CRIU drains every pty pair the tree holds (`tty_dump_queued_data` in criu/tty.c): it
//! switches the first open file of each end to non-blocking and reads whatever is queued (both directions: what
//! the master's reader has not read yet and what the slave's reader has not read yet) into `tty-data.img`. Only if
//! the drain itself fails or the tree is left running does it write the bytes back and switch the files back.
//! When phaul answers `post-dump` with failure and CRIU resumes the tree, the bytes would be lost and the tree's
//! pty files left non-blocking; phaul holds the resumed tree frozen (cgroup v2 freezer) and calls
//! [`write_back_tty_data`] before thawing it.
//!
//! That does what CRIU's own write-back does (`tty_do_writeback_queued_data`, `tty_reblock`): the bytes read from
//! end X are written into X's peer, so that they are queued for X's reader again, and each file CRIU switched gets
//! its status flags from files.img back. The descriptors used are the tree's own, taken with `pidfd_getfd` (a new
//! /dev/ptmx would be a new pty); one written into is non-blocking for the write and gets its flags back after.
//!
//! Unlike CRIU's write-back, the bytes do not go through the line discipline's processing a second time: they
//! were processed when they were first written (echoed, CR/NL translated, signal characters acted on), and CRIU
//! read them after that. While writing, the pty's settings are switched to pass bytes unchanged (no echo, no
//! output processing, no input translation, no signal or extended characters; canonical mode, and so line
//! boundaries, stay) and are then put back as they were, once the slave's line discipline has taken the input
//! over. It takes at most its buffer (4 KiB); input beyond that waits in the pty until the tree reads and is
//! processed then, under the tree's own settings. A pty in raw mode is not touched at all. For a master in
//! packet mode CRIU's image also holds the packet status bytes of its reads; they are written back as data, as
//! CRIU's restore would.
//!
//! What stays behind in the kernel is not seen by CRIU: an unfinished line queued for a slave in canonical mode
//! (CRIU's non-blocking read returns whole lines only) stays there, and the image's whole lines are queued after
//! it.
//!
//! CRIU reads at most 16 KiB per end ([`CRIU_QUEUE_LIMIT`]); what was queued beyond stays in the kernel. If an
//! entry is that long, whatever is still queued on X is read out first and written after the image's bytes, so
//! that the reader gets everything in its original order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{major, minor};
use nix::sys::termios::{tcgetattr, tcsetattr, InputFlags, LocalFlags, OutputFlags, SetArg, Termios};
use phaul_proto::criu::{FdTypes, FileEntry, TtyDataEntry, TtyFileEntry, TtyInfoEntry, TtyType};

use crate::images::{self, ImageError, FILES_MAGIC, TTY_DATA_MAGIC, TTY_INFO_MAGIC};
use crate::sys;

/// The most CRIU reads out of one pty end (the buffer of `tty_do_dump_queued_data`).
pub const CRIU_QUEUE_LIMIT: usize = 16384;

/// How long writing one entry back may wait for room in a full queue.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`settle`] waits at most, and how long a count that does not change means the line discipline is done.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);
const SETTLE_QUIET: Duration = Duration::from_millis(50);

/// The most written at once. A pty accounts its queue in the buffers each write allocates: written 1 KiB or less
/// at a time, about 20 KiB fit into an unread queue on Linux 6.18, written in larger pieces only about 13.5 KiB, less
/// than CRIU may have drained (see [`CRIU_QUEUE_LIMIT`]).
const WRITE_CHUNK: usize = 512;

/// The most read out of an end behind an entry that hit [`CRIU_QUEUE_LIMIT`] (a pty queues far less).
const MAX_REMAINDER: usize = 1 << 20;

/// /dev/ptmx and /dev/pts/ptmx: TTYAUX_MAJOR 5, minor 2.
const PTMX_MAJOR: u64 = 5;
const PTMX_MINOR: u64 = 2;
/// UNIX98_PTY_MASTER_MAJOR and UNIX98_PTY_SLAVE_MAJOR, each with UNIX98_PTY_MAJOR_COUNT (8) majors.
const PTY_MASTER_MAJOR: u64 = 128;
const PTY_SLAVE_MAJOR: u64 = 136;
const PTY_MAJOR_COUNT: u64 = 8;

/// One end of a pty pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum PtyEnd {
    Master,
    Slave,
}

impl PtyEnd {
    /// The other end of the pair.
    pub fn peer(self) -> PtyEnd {
        match self {
            PtyEnd::Master => PtyEnd::Slave,
            PtyEnd::Slave => PtyEnd::Master,
        }
    }

    /// The end a CRIU tty info id names: CRIU numbers them `(index << 1) | 1` for a master, `index << 1` for a
    /// slave (`tty_gen_id` in criu/tty.c).
    fn of_info_id(id: u32) -> PtyEnd {
        if id & 1 == 1 {
            PtyEnd::Master
        } else {
            PtyEnd::Slave
        }
    }
}

impl fmt::Display for PtyEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PtyEnd::Master => "master",
            PtyEnd::Slave => "slave",
        })
    }
}

/// The bytes put back into one pty end's queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TtyRequeued {
    /// The pty's number (N of /dev/pts/N in the tree's devpts).
    pub index: u32,
    /// The end CRIU read the bytes from: its reader gets them again.
    pub queued_for: PtyEnd,
    /// The end they were written into (`queued_for`'s peer).
    pub written_into: PtyEnd,
    /// The process of the tree whose descriptor was written into, and that descriptor's number there.
    pub holder_pid: i32,
    pub holder_fd: i32,
    /// The bytes of `tty-data.img`, written first.
    pub bytes: Vec<u8>,
    /// Bytes CRIU had left queued behind an entry of [`CRIU_QUEUE_LIMIT`] bytes, read out and written after
    /// `bytes` (empty unless CRIU hit its limit).
    pub remainder: Vec<u8>,
}

/// A pty end's open file that CRIU left non-blocking, given its own flags back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TtyReblocked {
    pub index: u32,
    pub end: PtyEnd,
    /// The process of the tree whose descriptor was used, and that descriptor's number there (other descriptors
    /// of the same open file share its flags).
    pub holder_pid: i32,
    pub holder_fd: i32,
    /// The status flags it had at dump time (files.img), now set again.
    pub flags: i32,
}

/// What [`write_back_tty_data`] put back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TtyWriteback {
    /// One per entry of `tty-data.img`, in the image's order.
    pub ttys: Vec<TtyRequeued>,
    /// The open files whose blocking mode (and other status flags) CRIU's drain had changed.
    pub reblocked: Vec<TtyReblocked>,
}

impl TtyWriteback {
    /// Whether nothing had to be put back.
    pub fn is_empty(&self) -> bool {
        self.ttys.is_empty() && self.reblocked.is_empty()
    }

    /// Every byte written, over all ptys.
    pub fn bytes_written(&self) -> usize {
        self.ttys.iter().map(|t| t.bytes.len() + t.remainder.len()).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TtyWritebackError {
    #[error("cannot read the dump's terminal images to put the drained pty data back: {0}")]
    Image(#[from] ImageError),
    #[error(
        "{path} holds queued data for terminal {tty_id:#x}, which tty-info.img does not describe; the images are not \
         of one dump (pass the image directory of the dump that drained the data)"
    )]
    UnknownTty { path: PathBuf, tty_id: u32 },
    #[error(
        "{path} holds queued data for terminal {tty_id:#x}, which tty-info.img describes as {kind}, not a pty end; \
         CRIU drains only ptys, so the image is corrupt"
    )]
    NotPty { path: PathBuf, tty_id: u32, kind: String },
    #[error(
        "{path} describes terminal {tty_id:#x} as pty {index}, but CRIU numbers the ends of pty N 2N (slave) and \
         2N+1 (master); the image is corrupt"
    )]
    Inconsistent { path: PathBuf, tty_id: u32, index: u32 },
    #[error(
        "{path} has no entry for the {end} of pty {index}, which CRIU writes for both ends of every pty whose data \
         it drains; the image directory is incomplete"
    )]
    MissingPeer { path: PathBuf, index: u32, end: PtyEnd },
    #[error(
        "cannot open a pidfd for process {pid} of the frozen tree: {source}; the tree must stay frozen (not killed, \
         not thawed) until its pty data is back"
    )]
    Pidfd { pid: i32, source: io::Error },
    #[error("cannot list the descriptors of process {pid} of the frozen tree in /proc/{pid}/fd: {source}")]
    ListFds { pid: i32, source: io::Error },
    #[error(
        "cannot take descriptor {fd} of process {pid} with pidfd_getfd: {source}; phaul needs ptrace access to the \
         tree (run it as root, and not under Yama ptrace_scope 3)"
    )]
    GetFd { pid: i32, fd: i32, source: io::Error },
    #[error("cannot ask descriptor {fd} of process {pid} (a pty master) for its pty number: {source}")]
    PtyNumber { pid: i32, fd: i32, source: io::Error },
    #[error(
        "no process of the frozen tree (pids {pids:?}) holds the {end} of pty {index}, so its {bytes} queued bytes \
         cannot be put back; pass the pids of every process of the tree, and keep it frozen until the data is back"
    )]
    NoHolder { index: u32, end: PtyEnd, bytes: usize, pids: Vec<i32> },
    #[error(
        "cannot give the {end} of pty {index} (descriptor {fd} of process {pid}) its status flags {flags:#o} back \
         after CRIU's drain left it non-blocking: {source}; the tree would find it non-blocking"
    )]
    Reblock { index: u32, end: PtyEnd, pid: i32, fd: i32, flags: i32, source: io::Error },
    #[error(
        "cannot read or change the line settings of pty {index} (through descriptor {fd} of process {pid}) to put its \
         queued data back unprocessed: {source}"
    )]
    Termios { index: u32, pid: i32, fd: i32, source: io::Error },
    #[error(
        "cannot switch the {end} of pty {index} (descriptor {fd} of process {pid}) to non-blocking mode: {source}"
    )]
    Flags { index: u32, end: PtyEnd, pid: i32, fd: i32, source: io::Error },
    #[error(
        "cannot read what CRIU left queued on the {end} of pty {index} (descriptor {fd} of process {pid}): {source}"
    )]
    Drain { index: u32, end: PtyEnd, pid: i32, fd: i32, source: io::Error },
    #[error(
        "writing the queued data back into the {end} of pty {index} (descriptor {fd} of process {pid}) failed after \
         {written} of {total} bytes: {source}"
    )]
    Write { index: u32, end: PtyEnd, pid: i32, fd: i32, written: usize, total: usize, source: io::Error },
    #[error(
        "the {end} of pty {index} (descriptor {fd} of process {pid}) took only {written} of {total} bytes within \
         {secs} s: its queue stays full (something outside the tree keeps writing to it, or its output is stopped \
         by ^S)"
    )]
    Timeout { index: u32, end: PtyEnd, pid: i32, fd: i32, written: usize, total: usize, secs: u64 },
}

/// A pty end some process of the tree holds open.
#[derive(Debug)]
struct Held {
    pid: i32,
    fd: i32,
    end: PtyEnd,
    index: u32,
    rdev: u64,
    dev: u64,
    file: File,
}

impl Held {
    /// Whether this is the very end CRIU described: same end, number, device and device of the file system it was
    /// opened on (CRIU stores the last two truncated to 32 bits).
    fn is(&self, end: PtyEnd, info: &TtyInfoEntry) -> bool {
        self.end == end
            && info.pty.as_ref().is_some_and(|p| p.index == self.index)
            && self.rdev as u32 == info.rdev
            && !matches!(info.dev, Some(d) if d != self.dev as u32)
    }
}

/// What one entry of tty-data.img asks for.
#[derive(Debug)]
struct Plan<'a> {
    index: u32,
    queued_for: PtyEnd,
    bytes: Vec<u8>,
    /// The end the bytes were read from (the tree holds it unless it closed it after the dump).
    source: Option<&'a Held>,
    /// Whether what CRIU left queued on `source` must be read out first.
    drain: bool,
    target: &'a Held,
}

/// Puts back what CRIU's dump took from the tree's ptys: the bytes it drained out of their queues, and the
/// blocking mode of their open files.
///
/// CRIU drains every pty pair of the tree at the end of a dump (`tty_dump_queued_data`): it switches the first
/// open file of each end it dumped to non-blocking (`O_RDWR | O_NONBLOCK`: other status flags such as O_ASYNC are
/// cleared too), reads the queue into `tty-data.img`, and, when the tree was to die (`leave_running` false),
/// neither writes the bytes back nor switches the files back, also when the tree is resumed later. This does both,
/// as CRIU's own write-back would (`tty_do_writeback_queued_data`, `tty_reblock`).
///
/// Call it only when CRIU got that far and did not write back itself: after a dump without `leave_running` that
/// was failed at or after `post-dump`. With `leave_running`, or when the dump failed inside the drain, CRIU has
/// written the bytes back already and they would be queued twice.
///
/// `image_dir` is the dump's image directory; `pids` are the host pids of every process of the tree, which must
/// be frozen (or stopped) so that nothing reads or writes its ptys meanwhile. Without `tty-data.img` and
/// `tty-info.img` there is nothing to do. Every entry of `tty-data.img` is checked and every descriptor found
/// before the first byte is written; the files are switched back even when putting the bytes back fails.
pub fn write_back_tty_data(image_dir: &Path, pids: &[i32]) -> Result<TtyWriteback, TtyWritebackError> {
    let data_path = image_dir.join("tty-data.img");
    let info_path = image_dir.join("tty-info.img");
    let entries: Vec<TtyDataEntry> = if data_path.exists() {
        images::read_entries::<TtyDataEntry>(&data_path, TTY_DATA_MAGIC)?
            .into_iter()
            .filter(|e| !e.data.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    if entries.is_empty() && !info_path.exists() {
        return Ok(TtyWriteback::default());
    }
    let infos: BTreeMap<u32, TtyInfoEntry> =
        images::read_entries::<TtyInfoEntry>(&info_path, TTY_INFO_MAGIC)?.into_iter().map(|i| (i.id, i)).collect();

    // The ends CRIU drained: both ends of every pty whose two ends the tree held.
    let drained: Vec<&TtyInfoEntry> = infos
        .values()
        .filter(|i| i.r#type == TtyType::Pty as i32 && i.pty.is_some() && infos.contains_key(&(i.id ^ 1)))
        .collect();
    if entries.is_empty() && drained.is_empty() {
        return Ok(TtyWriteback::default());
    }
    let files_path = image_dir.join("files.img");
    let tty_files: Vec<TtyFileEntry> = if drained.is_empty() {
        Vec::new()
    } else {
        images::read_entries::<FileEntry>(&files_path, FILES_MAGIC)?
            .into_iter()
            .filter(|f| f.r#type == FdTypes::Tty as i32)
            .filter_map(|f| f.tty)
            .collect()
    };

    // Check every entry against the images before looking at the tree.
    let wanted = check_entries(entries, &infos, &data_path, &info_path);
    let held = held_pty_ends(pids)?;
    let mut done = TtyWriteback::default();
    let written = wanted.and_then(|w| plan(w, &held, pids)).and_then(|plans| put_all_back(plans, &mut done));
    let reblocked = reblock(&drained, &tty_files, &held, &mut done);
    written?;
    reblocked?;
    Ok(done)
}

/// One entry of tty-data.img with the tty-info entries of the end it was read from and of its peer.
type Wanted<'a> = (Vec<u8>, u32, PtyEnd, &'a TtyInfoEntry, &'a TtyInfoEntry);

fn check_entries<'a>(
    entries: Vec<TtyDataEntry>,
    infos: &'a BTreeMap<u32, TtyInfoEntry>,
    data_path: &Path,
    info_path: &Path,
) -> Result<Vec<Wanted<'a>>, TtyWritebackError> {
    let mut wanted = Vec::with_capacity(entries.len());
    for e in entries {
        let info = infos
            .get(&e.tty_id)
            .ok_or_else(|| TtyWritebackError::UnknownTty { path: data_path.to_path_buf(), tty_id: e.tty_id })?;
        let index = pty_index(info_path, info)?;
        let queued_for = PtyEnd::of_info_id(info.id);
        let peer_info = infos.get(&(info.id ^ 1)).ok_or_else(|| TtyWritebackError::MissingPeer {
            path: info_path.to_path_buf(),
            index,
            end: queued_for.peer(),
        })?;
        wanted.push((e.data, index, queued_for, info, peer_info));
    }
    Ok(wanted)
}

/// Finds the descriptor each entry goes into.
fn plan<'a>(wanted: Vec<Wanted<'_>>, held: &'a [Held], pids: &[i32]) -> Result<Vec<Plan<'a>>, TtyWritebackError> {
    let mut plans = Vec::with_capacity(wanted.len());
    for (bytes, index, queued_for, info, peer_info) in wanted {
        let written_into = queued_for.peer();
        let target = held.iter().find(|h| h.is(written_into, peer_info)).ok_or_else(|| {
            TtyWritebackError::NoHolder { index, end: written_into, bytes: bytes.len(), pids: pids.to_vec() }
        })?;
        let packet_master = queued_for == PtyEnd::Master && info.packet_mode;
        if packet_master {
            log::warn!(
                "pty {index}'s master is in packet mode: the {} bytes CRIU drained from it hold packet status bytes, \
                 which go back as data (as CRIU's restore does)",
                bytes.len()
            );
        }
        // Only when CRIU stopped at its limit can more be queued behind (it reads until the queue is empty
        // otherwise), and a packet-mode master's read would consume a pending status event.
        let drain = bytes.len() >= CRIU_QUEUE_LIMIT && !packet_master;
        let source = held.iter().find(|h| h.is(queued_for, info));
        plans.push(Plan { index, queued_for, bytes, source, drain, target });
    }
    Ok(plans)
}

fn put_all_back(plans: Vec<Plan<'_>>, done: &mut TtyWriteback) -> Result<(), TtyWritebackError> {
    for p in plans {
        let remainder = match p.source {
            Some(s) if p.drain => drain(s, p.index)?,
            _ => Vec::new(),
        };
        let line = Transparent::new(p.target, p.index)?;
        // Input (written into the master) is processed when the slave's line discipline takes it over, in the
        // background: the settings must stay until it has.
        let reader = p.source.filter(|_| line.changed() && p.target.end == PtyEnd::Master);
        let before = reader.map(|r| sys::queued_input(r.file.as_fd()).unwrap_or(0));
        put_back(p.target, p.index, &[&p.bytes, &remainder])?;
        if let (Some(r), Some(before)) = (reader, before) {
            settle(r, before + p.bytes.len() + remainder.len());
        }
        line.restore()?;
        log::debug!(
            "put {} bytes back in the queue of pty {}'s {} (through descriptor {} of process {}){}",
            p.bytes.len() + remainder.len(),
            p.index,
            p.queued_for,
            p.target.fd,
            p.target.pid,
            if remainder.is_empty() { String::new() } else { format!(", {} of them left by CRIU", remainder.len()) }
        );
        done.ttys.push(TtyRequeued {
            index: p.index,
            queued_for: p.queued_for,
            written_into: p.target.end,
            holder_pid: p.target.pid,
            holder_fd: p.target.fd,
            bytes: p.bytes,
            remainder,
        });
    }
    Ok(())
}

/// The status flags F_SETFL changes (SETFL_MASK in fs/fcntl.c).
const SETFL_MASK: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;

/// Undoes CRIU's `tty_unblock` on every drained end: CRIU switched the first open file it dumped of each end (the
/// first of the end's entries in files.img) to `O_RDWR | O_NONBLOCK` unless it had both, which leaves it with
/// O_NONBLOCK as its only changeable status flag.
fn reblock(
    drained: &[&TtyInfoEntry],
    tty_files: &[TtyFileEntry],
    held: &[Held],
    done: &mut TtyWriteback,
) -> Result<(), TtyWritebackError> {
    let criu_mask = libc::O_RDWR | libc::O_NONBLOCK;
    let mut first_error = None;
    for info in drained {
        let Some(index) = info.pty.as_ref().map(|p| p.index) else { continue };
        let end = PtyEnd::of_info_id(info.id);
        let files: Vec<i32> = tty_files.iter().filter(|f| f.tty_info_id == info.id).map(|f| f.flags as i32).collect();
        let Some(&flags) = files.first() else { continue };
        if flags & criu_mask == criu_mask || flags & SETFL_MASK == libc::O_NONBLOCK {
            continue; // CRIU's switch changed nothing
        }
        if files.iter().any(|f| f & SETFL_MASK == libc::O_NONBLOCK) {
            // Another open file of the end was non-blocking already: which one CRIU switched cannot be told.
            log::warn!(
                "cannot tell which open file of pty {index}'s {end} CRIU switched to non-blocking (another one is \
                 non-blocking itself); it stays non-blocking"
            );
            continue;
        }
        for h in held.iter().filter(|h| h.is(end, info)) {
            let Ok(now) = fcntl(h.file.as_raw_fd(), FcntlArg::F_GETFL) else { continue };
            if now & SETFL_MASK != libc::O_NONBLOCK {
                continue; // not the file CRIU switched, or one sharing it and already done
            }
            match restore_flags(h, flags, now) {
                Ok(()) => done.reblocked.push(TtyReblocked { index, end, holder_pid: h.pid, holder_fd: h.fd, flags }),
                Err(source) => {
                    let e = TtyWritebackError::Reblock { index, end, pid: h.pid, fd: h.fd, flags, source };
                    log::warn!("{e}");
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Sets the changeable status flags of `flags` on a file whose flags are `now`.
///
/// Turning O_ASYNC on makes a tty file without a SIGIO owner take its foreground group or the calling thread as
/// its owner (an existing owner stays). A file whose owner reads as none before is given none again when one
/// shows up. (F_GETOWN_EX reads an owner that is a thread other than a process's main thread as none, so when
/// this runs on such a thread of phaul and the file really had no owner, that thread stays its owner.)
fn restore_flags(h: &Held, flags: i32, now: i32) -> io::Result<()> {
    let async_on = flags & libc::O_ASYNC != 0 && now & libc::O_ASYNC == 0;
    let owner = if async_on { Some(sys::file_owner(h.file.as_fd())?) } else { None };
    let new = OFlag::from_bits_retain((flags & SETFL_MASK) | (now & !SETFL_MASK));
    fcntl(h.file.as_raw_fd(), FcntlArg::F_SETFL(new))?;
    if let Some(before) = owner.filter(|o| o.id == 0) {
        if sys::file_owner(h.file.as_fd())?.id != 0 {
            sys::set_file_owner(h.file.as_fd(), before)?;
        }
    }
    Ok(())
}

/// The pty number of a tty info entry, checked against CRIU's numbering of the ends.
fn pty_index(path: &Path, info: &TtyInfoEntry) -> Result<u32, TtyWritebackError> {
    if info.r#type != TtyType::Pty as i32 {
        let kind = match TtyType::try_from(info.r#type) {
            Ok(TtyType::Console) => "the console (/dev/console)".to_string(),
            Ok(TtyType::Vt) => "a virtual console".to_string(),
            Ok(TtyType::Ctty) => "the controlling terminal (/dev/tty)".to_string(),
            Ok(TtyType::ExtTty) => "an external terminal".to_string(),
            Ok(TtyType::Serial) => "a serial line".to_string(),
            Ok(TtyType::Unknown) | Ok(TtyType::Pty) | Err(_) => format!("a terminal of unknown type {}", info.r#type),
        };
        return Err(TtyWritebackError::NotPty { path: path.to_path_buf(), tty_id: info.id, kind });
    }
    let Some(pty) = info.pty.as_ref() else {
        return Err(TtyWritebackError::NotPty {
            path: path.to_path_buf(),
            tty_id: info.id,
            kind: "a pty without a number".into(),
        });
    };
    if pty.index != info.id >> 1 {
        return Err(TtyWritebackError::Inconsistent { path: path.to_path_buf(), tty_id: info.id, index: pty.index });
    }
    Ok(pty.index)
}

/// Which end of which pty a device number is, when it is one (the number of a master is asked separately).
fn classify(rdev: u64) -> Option<(PtyEnd, Option<u32>)> {
    let (ma, mi) = (major(rdev), minor(rdev));
    if (ma == PTMX_MAJOR && mi == PTMX_MINOR) || (PTY_MASTER_MAJOR..PTY_MASTER_MAJOR + PTY_MAJOR_COUNT).contains(&ma) {
        Some((PtyEnd::Master, None))
    } else if (PTY_SLAVE_MAJOR..PTY_SLAVE_MAJOR + PTY_MAJOR_COUNT).contains(&ma) {
        u32::try_from((ma - PTY_SLAVE_MAJOR) * 256 + mi).ok().map(|i| (PtyEnd::Slave, Some(i)))
    } else {
        None
    }
}

/// Every pty end the processes hold, each with a descriptor of our own sharing its open file.
fn held_pty_ends(pids: &[i32]) -> Result<Vec<Held>, TtyWritebackError> {
    let mut held = Vec::new();
    for pid in pids.iter().copied().collect::<BTreeSet<i32>>() {
        let pidfd = sys::pidfd_open(pid).map_err(|source| TtyWritebackError::Pidfd { pid, source })?;
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let list = std::fs::read_dir(&dir).map_err(|source| TtyWritebackError::ListFds { pid, source })?;
        let mut fds: Vec<i32> = Vec::new();
        for ent in list {
            let ent = ent.map_err(|source| TtyWritebackError::ListFds { pid, source })?;
            if let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                fds.push(fd);
            }
        }
        fds.sort_unstable();
        for fd in fds {
            // stat() through the /proc link looks at the open file itself without opening anything.
            let Ok(meta) = std::fs::metadata(dir.join(fd.to_string())) else { continue };
            if !meta.file_type().is_char_device() {
                continue;
            }
            let Some((end, index)) = classify(meta.rdev()) else { continue };
            let file = File::from(get_fd(pidfd.as_fd(), pid, fd)?);
            let index = match index {
                Some(i) => i,
                None => {
                    sys::pty_number(file.as_fd()).map_err(|source| TtyWritebackError::PtyNumber { pid, fd, source })?
                }
            };
            // The descriptor's own stat is the one CRIU recorded (it is the same open file).
            let meta = file.metadata().map_err(|source| TtyWritebackError::GetFd { pid, fd, source })?;
            held.push(Held { pid, fd, end, index, rdev: meta.rdev(), dev: meta.dev(), file });
        }
    }
    Ok(held)
}

fn get_fd(pidfd: BorrowedFd<'_>, pid: i32, fd: i32) -> Result<OwnedFd, TtyWritebackError> {
    sys::pidfd_getfd(pidfd, fd).map_err(|source| TtyWritebackError::GetFd { pid, fd, source })
}

/// Non-blocking mode on a descriptor the tree shares, undone when dropped (CRIU's tty_unblock and tty_reblock).
struct Unblocked<'a> {
    held: &'a Held,
    flags: Option<OFlag>,
}

impl<'a> Unblocked<'a> {
    fn new(held: &'a Held, index: u32) -> Result<Unblocked<'a>, TtyWritebackError> {
        let err = |e: nix::Error| TtyWritebackError::Flags {
            index,
            end: held.end,
            pid: held.pid,
            fd: held.fd,
            source: e.into(),
        };
        let flags = OFlag::from_bits_retain(fcntl(held.file.as_raw_fd(), FcntlArg::F_GETFL).map_err(err)?);
        if flags.contains(OFlag::O_NONBLOCK) {
            return Ok(Unblocked { held, flags: None });
        }
        fcntl(held.file.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(err)?;
        Ok(Unblocked { held, flags: Some(flags) })
    }

    /// Puts the tree's flags back, reporting a failure.
    fn restore(mut self, index: u32) -> Result<(), TtyWritebackError> {
        match self.flags.take() {
            Some(flags) => fcntl(self.held.file.as_raw_fd(), FcntlArg::F_SETFL(flags)).map(drop).map_err(|e| {
                TtyWritebackError::Flags {
                    index,
                    end: self.held.end,
                    pid: self.held.pid,
                    fd: self.held.fd,
                    source: e.into(),
                }
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Unblocked<'_> {
    fn drop(&mut self) {
        if let Some(flags) = self.flags.take() {
            if let Err(e) = fcntl(self.held.file.as_raw_fd(), FcntlArg::F_SETFL(flags)) {
                log::warn!(
                    "cannot switch descriptor {} of process {} back to blocking mode: {e}",
                    self.held.fd,
                    self.held.pid
                );
            }
        }
    }
}

/// The pty's line settings switched to pass written bytes unchanged, put back when dropped.
///
/// The settings are the slave's (a master's ioctls reach its slave's), and they govern both directions: output
/// processing for what is written into the slave, input processing and echo for what is written into the master
/// (the master's own settings are fixed to raw by the kernel).
struct Transparent<'a> {
    held: &'a Held,
    index: u32,
    saved: Option<Termios>,
}

impl<'a> Transparent<'a> {
    fn new(held: &'a Held, index: u32) -> Result<Transparent<'a>, TtyWritebackError> {
        let saved = tcgetattr(held.file.as_fd()).map_err(|e| Self::error(held, index, e))?;
        let pass = pass_through(&saved);
        if same_flags(&pass, &saved) {
            return Ok(Transparent { held, index, saved: None });
        }
        tcsetattr(held.file.as_fd(), SetArg::TCSANOW, &pass).map_err(|e| Self::error(held, index, e))?;
        Ok(Transparent { held, index, saved: Some(saved) })
    }

    /// Whether the settings had to be switched (not so for a pty in raw mode).
    fn changed(&self) -> bool {
        self.saved.is_some()
    }

    fn error(held: &Held, index: u32, e: nix::Error) -> TtyWritebackError {
        TtyWritebackError::Termios { index, pid: held.pid, fd: held.fd, source: e.into() }
    }

    /// Puts the tree's settings back, reporting a failure.
    fn restore(mut self) -> Result<(), TtyWritebackError> {
        match self.saved.take() {
            Some(t) => tcsetattr(self.held.file.as_fd(), SetArg::TCSANOW, &t)
                .map_err(|e| Self::error(self.held, self.index, e)),
            None => Ok(()),
        }
    }
}

impl Drop for Transparent<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.saved.take() {
            if let Err(e) = tcsetattr(self.held.file.as_fd(), SetArg::TCSANOW, &t) {
                log::warn!("cannot put the line settings of pty {} back: {e}", self.index);
            }
        }
    }
}

fn same_flags(a: &Termios, b: &Termios) -> bool {
    a.input_flags == b.input_flags && a.output_flags == b.output_flags && a.local_flags == b.local_flags
}

/// `t` with everything off that would change, add or act on bytes written into the pty, except canonical mode
/// (which keeps line boundaries) and flow control (turning IXON off would restart a stopped output).
fn pass_through(t: &Termios) -> Termios {
    let mut t = t.clone();
    t.input_flags.remove(
        InputFlags::ICRNL
            | InputFlags::INLCR
            | InputFlags::IGNCR
            | InputFlags::ISTRIP
            | InputFlags::from_bits_retain(libc::IUCLC),
    );
    t.output_flags.remove(OutputFlags::OPOST);
    t.local_flags.remove(
        LocalFlags::ECHO
            | LocalFlags::ECHOE
            | LocalFlags::ECHOK
            | LocalFlags::ECHONL
            | LocalFlags::ECHOCTL
            | LocalFlags::ECHOKE
            | LocalFlags::ECHOPRT
            | LocalFlags::ISIG
            | LocalFlags::IEXTEN,
    );
    t
}

/// Waits until the line discipline of `reader` has taken over the input written for it: until `want` bytes are
/// queued for it, or its count stops growing (its buffer is full: 4 KiB, the rest stays in the pty's buffers
/// until the tree reads, and is processed then under the tree's own settings). At most [`SETTLE_TIMEOUT`].
fn settle(reader: &Held, want: usize) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = usize::MAX;
    let mut since = Instant::now();
    while Instant::now() < deadline {
        let Ok(n) = sys::queued_input(reader.file.as_fd()) else { break };
        if n >= want {
            return;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= SETTLE_QUIET {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    log::debug!("pty input settled at {last} of {want} queued bytes");
}

/// Reads out what is still queued on an end, without waiting.
fn drain(held: &Held, index: u32) -> Result<Vec<u8>, TtyWritebackError> {
    let unblocked = Unblocked::new(held, index)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < MAX_REMAINDER {
        match (&held.file).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Nothing queued, or the other end is closed (a pty reads EIO then).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EIO) => break,
            Err(source) => {
                return Err(TtyWritebackError::Drain { index, end: held.end, pid: held.pid, fd: held.fd, source })
            }
        }
    }
    unblocked.restore(index)?;
    Ok(out)
}

/// Writes the parts, in order, into an end, handling partial writes and a full queue (bounded in time).
fn put_back(held: &Held, index: u32, parts: &[&[u8]]) -> Result<(), TtyWritebackError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let unblocked = Unblocked::new(held, index)?;
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut written = 0;
    let (pid, fd, end) = (held.pid, held.fd, held.end);
    for part in parts {
        let mut rest: &[u8] = part;
        while !rest.is_empty() {
            match (&held.file).write(&rest[..rest.len().min(WRITE_CHUNK)]) {
                Ok(0) => {
                    let source = io::Error::new(io::ErrorKind::WriteZero, "the pty took no bytes");
                    return Err(TtyWritebackError::Write { index, end, pid, fd, written, total, source });
                }
                Ok(n) => {
                    rest = &rest[n..];
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let secs = WRITE_TIMEOUT.as_secs();
                        return Err(TtyWritebackError::Timeout { index, end, pid, fd, written, total, secs });
                    }
                    // The line discipline takes queued bytes over in the background and a pty does not always
                    // wake a writer when that makes room: look again every few milliseconds.
                    let ms = u16::try_from(left.as_millis().min(10)).unwrap_or(10);
                    let mut fds = [PollFd::new(held.file.as_fd(), PollFlags::POLLOUT)];
                    match poll(&mut fds, PollTimeout::from(ms)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            let source = e.into();
                            return Err(TtyWritebackError::Write { index, end, pid, fd, written, total, source });
                        }
                    }
                }
                Err(source) => return Err(TtyWritebackError::Write { index, end, pid, fd, written, total, source }),
            }
        }
    }
    unblocked.restore(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::IMG_COMMON_MAGIC;
    use phaul_proto::criu::TtyPtyEntry;
    use prost::Message;
    use std::os::fd::AsRawFd;

    fn write_image(path: &Path, magic: u32, entries: &[Vec<u8>]) {
        let mut f = File::create(path).expect("create image");
        f.write_all(&IMG_COMMON_MAGIC.to_le_bytes()).expect("write");
        f.write_all(&magic.to_le_bytes()).expect("write");
        for e in entries {
            f.write_all(&(e.len() as u32).to_le_bytes()).expect("write");
            f.write_all(e).expect("write");
        }
    }

    /// A pty pair of this process, in raw mode.
    struct Pty {
        master: File,
        slave: File,
        index: u32,
    }

    fn raw_pty() -> Pty {
        let p = nix::pty::openpty(None, None).expect("openpty");
        let mut t = nix::sys::termios::tcgetattr(&p.slave).expect("tcgetattr");
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&p.slave, nix::sys::termios::SetArg::TCSANOW, &t).expect("tcsetattr");
        let index = sys::pty_number(p.master.as_fd()).expect("TIOCGPTN");
        Pty { master: File::from(p.master), slave: File::from(p.slave), index }
    }

    /// The tty-info entry CRIU would write for an end.
    fn info_of(f: &File, index: u32, end: PtyEnd) -> Vec<u8> {
        let m = f.metadata().expect("fstat");
        TtyInfoEntry {
            id: (index << 1) | u32::from(end == PtyEnd::Master),
            r#type: TtyType::Pty as i32,
            packet_mode: false,
            rdev: m.rdev() as u32,
            pty: Some(TtyPtyEntry { index }),
            dev: Some(m.dev() as u32),
        }
        .encode_to_vec()
    }

    /// tty-info.img and files.img as CRIU writes them for a pty pair both of whose ends the tree holds (the
    /// files' flags are their flags now).
    fn write_pty_images(dir: &Path, pty: &Pty) {
        let i = pty.index;
        write_image(
            &dir.join("tty-info.img"),
            TTY_INFO_MAGIC,
            &[info_of(&pty.master, i, PtyEnd::Master), info_of(&pty.slave, i, PtyEnd::Slave)],
        );
        let file = |id: u32, f: &File, end: PtyEnd| {
            let flags = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl") as u32;
            let tty_info_id = (i << 1) | u32::from(end == PtyEnd::Master);
            FileEntry { r#type: FdTypes::Tty as i32, id, tty: Some(TtyFileEntry { id, tty_info_id, flags }) }
                .encode_to_vec()
        };
        let other = FileEntry { r#type: 1, id: 1, tty: None }.encode_to_vec();
        write_image(
            &dir.join("files.img"),
            FILES_MAGIC,
            &[other, file(2, &pty.master, PtyEnd::Master), file(3, &pty.slave, PtyEnd::Slave)],
        );
    }

    fn data(id: u32, bytes: &[u8]) -> Vec<u8> {
        TtyDataEntry { tty_id: id, data: bytes.to_vec() }.encode_to_vec()
    }

    /// Reads exactly `want` bytes queued on `f`, waiting at most two seconds for them.
    fn read_queued(f: &File, want: usize) -> Vec<u8> {
        let flags = OFlag::from_bits_retain(fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl"));
        fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).expect("setfl");
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut out = vec![0u8; want];
        let mut got = 0;
        while got < want && Instant::now() < deadline {
            match (&*f).read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("read: {e}"),
            }
        }
        out.truncate(got);
        out
    }

    /// Whether nothing (more) is queued on `f` (it is non-blocking after read_queued).
    fn nothing_queued(f: &File) -> bool {
        std::thread::sleep(Duration::from_millis(20));
        let mut b = [0u8; 1];
        matches!((&*f).read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn no_tty_data_is_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("nothing to do");
        assert!(done.is_empty());
        assert_eq!(done.bytes_written(), 0);
    }

    #[test]
    fn image_errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = [std::process::id() as i32];
        write_image(&dir.path().join("tty-data.img"), TTY_DATA_MAGIC, &[data(7, b"x")]);
        // No tty-info.img.
        assert!(matches!(write_back_tty_data(dir.path(), &me), Err(TtyWritebackError::Image(ImageError::Io { .. }))));
        // tty-info.img without the entry.
        write_image(&dir.path().join("tty-info.img"), TTY_INFO_MAGIC, &[]);
        let e = write_back_tty_data(dir.path(), &me).expect_err("unknown tty");
        assert!(matches!(e, TtyWritebackError::UnknownTty { tty_id: 7, .. }), "{e}");
        // The entry names a console.
        let console = TtyInfoEntry { id: 7, r#type: TtyType::Console as i32, ..Default::default() }.encode_to_vec();
        write_image(&dir.path().join("tty-info.img"), TTY_INFO_MAGIC, &[console]);
        let e = write_back_tty_data(dir.path(), &me).expect_err("not a pty");
        assert!(e.to_string().contains("as the console"), "{e}");
        // A pty whose number does not fit CRIU's numbering.
        let odd = TtyInfoEntry {
            id: 7,
            r#type: TtyType::Pty as i32,
            pty: Some(TtyPtyEntry { index: 9 }),
            ..Default::default()
        }
        .encode_to_vec();
        write_image(&dir.path().join("tty-info.img"), TTY_INFO_MAGIC, &[odd]);
        assert!(matches!(write_back_tty_data(dir.path(), &me), Err(TtyWritebackError::Inconsistent { .. })));
        // The master of pty 3 without its slave's entry.
        let master = TtyInfoEntry {
            id: 7,
            r#type: TtyType::Pty as i32,
            pty: Some(TtyPtyEntry { index: 3 }),
            ..Default::default()
        }
        .encode_to_vec();
        write_image(&dir.path().join("tty-info.img"), TTY_INFO_MAGIC, &[master]);
        let e = write_back_tty_data(dir.path(), &me).expect_err("no peer");
        assert!(matches!(e, TtyWritebackError::MissingPeer { index: 3, end: PtyEnd::Slave, .. }), "{e}");
        // Wrong magic.
        write_image(&dir.path().join("tty-data.img"), TTY_INFO_MAGIC, &[]);
        assert!(matches!(
            write_back_tty_data(dir.path(), &me),
            Err(TtyWritebackError::Image(ImageError::Magic { .. }))
        ));
    }

    #[test]
    fn puts_data_back_both_ways_through_our_own_descriptors() {
        let pty = raw_pty();
        let dir = tempfile::tempdir().expect("tempdir");
        let to_slave = b"for the slave's reader \x00\x01\xff".to_vec();
        let to_master = b"for the master's reader\n".to_vec();
        let (sid, mid) = (pty.index << 1, (pty.index << 1) | 1);
        write_pty_images(dir.path(), &pty);
        write_image(&dir.path().join("tty-data.img"), TTY_DATA_MAGIC, &[data(sid, &to_slave), data(mid, &to_master)]);
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("write back");
        assert_eq!(done.ttys.len(), 2);
        assert_eq!(done.ttys[0].queued_for, PtyEnd::Slave);
        assert_eq!(done.ttys[0].written_into, PtyEnd::Master);
        assert_eq!(done.ttys[0].holder_fd, pty.master.as_raw_fd());
        assert_eq!(done.ttys[1].queued_for, PtyEnd::Master);
        assert_eq!(done.ttys[1].holder_fd, pty.slave.as_raw_fd());
        assert_eq!(done.bytes_written(), to_slave.len() + to_master.len());
        assert_eq!(read_queued(&pty.slave, to_slave.len()), to_slave);
        assert_eq!(read_queued(&pty.master, to_master.len()), to_master);
        assert!(nothing_queued(&pty.slave) && nothing_queued(&pty.master));
    }

    #[test]
    fn cooked_ptys_get_their_bytes_back_unprocessed() {
        // The kernel's defaults: canonical, echo, CR to NL on input, NL to CR NL on output.
        let p = nix::pty::openpty(None, None).expect("openpty");
        let index = sys::pty_number(p.master.as_fd()).expect("TIOCGPTN");
        let pty = Pty { master: File::from(p.master), slave: File::from(p.slave), index };
        let before = tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
        assert!(before.local_flags.contains(LocalFlags::ECHO | LocalFlags::ICANON));
        (&pty.master).write_all(b"typed ahead\r").expect("type");
        (&pty.slave).write_all(b"printed\n").expect("print");
        // What the readers have queued, which CRIU would drain: the line, and the echo plus the output.
        let for_slave = read_queued(&pty.slave, b"typed ahead\n".len());
        assert_eq!(for_slave, b"typed ahead\n");
        let for_master = read_queued(&pty.master, b"typed ahead\r\nprinted\r\n".len());
        assert_eq!(for_master.len(), b"typed ahead\r\nprinted\r\n".len(), "{:?}", String::from_utf8_lossy(&for_master));
        let dir = tempfile::tempdir().expect("tempdir");
        let i = pty.index;
        write_pty_images(dir.path(), &pty);
        write_image(
            &dir.path().join("tty-data.img"),
            TTY_DATA_MAGIC,
            &[data(i << 1, &for_slave), data((i << 1) | 1, &for_master)],
        );
        write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("write back");
        // No second echo, no CR added again, and the line is a line again.
        assert_eq!(read_queued(&pty.slave, for_slave.len()), for_slave);
        assert_eq!(read_queued(&pty.master, for_master.len()), for_master);
        assert!(nothing_queued(&pty.slave) && nothing_queued(&pty.master));
        let after = tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
        assert!(same_flags(&before, &after), "the pty's settings were not put back");
    }

    #[test]
    fn keeps_the_order_when_criu_hit_its_limit() {
        let pty = raw_pty();
        let dir = tempfile::tempdir().expect("tempdir");
        let all: Vec<u8> = (0..18_000u32).map(|i| (i % 251) as u8).collect();
        // Queue everything for the slave's reader, then take out what CRIU would (its 16 KiB).
        let master = Held {
            pid: 0,
            fd: pty.master.as_raw_fd(),
            end: PtyEnd::Master,
            index: pty.index,
            rdev: 0,
            dev: 0,
            file: pty.master.try_clone().expect("dup"),
        };
        put_back(&master, pty.index, &[&all]).expect("queue 18000 bytes");
        let criu_read = read_queued(&pty.slave, CRIU_QUEUE_LIMIT);
        assert_eq!(criu_read, all[..CRIU_QUEUE_LIMIT]);
        let i = pty.index;
        write_pty_images(dir.path(), &pty);
        write_image(&dir.path().join("tty-data.img"), TTY_DATA_MAGIC, &[data(i << 1, &criu_read)]);
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("write back");
        assert_eq!(done.ttys.len(), 1);
        assert_eq!(done.ttys[0].remainder.len(), all.len() - CRIU_QUEUE_LIMIT);
        assert_eq!(read_queued(&pty.slave, all.len()), all);
        assert!(nothing_queued(&pty.slave));
    }

    #[test]
    fn a_missing_holder_is_reported_before_anything_is_written() {
        let pty = raw_pty();
        let dir = tempfile::tempdir().expect("tempdir");
        let i = pty.index;
        write_pty_images(dir.path(), &pty);
        // The first entry can be put back, the second names a pty nobody holds.
        let ghost = TtyInfoEntry {
            id: ((i + 1000) << 1) | 1,
            r#type: TtyType::Pty as i32,
            pty: Some(TtyPtyEntry { index: i + 1000 }),
            ..Default::default()
        };
        let ghost_slave = TtyInfoEntry { id: (i + 1000) << 1, ..ghost };
        let mut infos = vec![info_of(&pty.master, i, PtyEnd::Master), info_of(&pty.slave, i, PtyEnd::Slave)];
        infos.push(ghost.encode_to_vec());
        infos.push(ghost_slave.encode_to_vec());
        write_image(&dir.path().join("tty-info.img"), TTY_INFO_MAGIC, &infos);
        write_image(&dir.path().join("tty-data.img"), TTY_DATA_MAGIC, &[data(i << 1, b"abc"), data(ghost.id, b"x")]);
        let e = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect_err("no holder");
        assert!(matches!(e, TtyWritebackError::NoHolder { end: PtyEnd::Slave, .. }), "{e}");
        assert!(e.to_string().contains(&format!("pty {}", i + 1000)), "{e}");
        assert_eq!(sys::queued_input(pty.slave.as_fd()).expect("FIONREAD"), 0, "nothing was written");
    }

    fn status(f: &File) -> i32 {
        fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl") & SETFL_MASK
    }

    /// What CRIU's tty_unblock does to a file of the tree.
    fn criu_unblock(f: &File) {
        fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_RDWR | OFlag::O_NONBLOCK)).expect("setfl");
    }

    #[test]
    fn gives_the_files_their_blocking_mode_back_without_any_data() {
        let pty = raw_pty();
        let dir = tempfile::tempdir().expect("tempdir");
        write_pty_images(dir.path(), &pty);
        criu_unblock(&pty.master);
        criu_unblock(&pty.slave);
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("reblock");
        assert!(done.ttys.is_empty());
        assert_eq!(done.reblocked.len(), 2, "{done:?}");
        assert_eq!(status(&pty.master), 0);
        assert_eq!(status(&pty.slave), 0);
        // Done once: a second call finds nothing to do.
        assert!(write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("again").is_empty());
    }

    #[test]
    fn keeps_the_sigio_owner_when_o_async_comes_back() {
        let pty = raw_pty();
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("start sleep");
        let owner = sys::FileOwner { kind: 1, id: sleeper.id() as i32 };
        sys::set_file_owner(pty.slave.as_fd(), owner).expect("F_SETOWN_EX");
        let flags = OFlag::from_bits_retain(fcntl(pty.slave.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl"));
        fcntl(pty.slave.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_ASYNC)).expect("setfl");
        let dir = tempfile::tempdir().expect("tempdir");
        write_pty_images(dir.path(), &pty);
        criu_unblock(&pty.slave);
        assert_eq!(status(&pty.slave), libc::O_NONBLOCK);
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]);
        // Read while the owner lives (a dead owner reads as 0).
        let owner_after = sys::file_owner(pty.slave.as_fd());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let done = done.expect("reblock");
        assert_eq!(done.reblocked.len(), 1, "{done:?}");
        assert_eq!(status(&pty.slave), libc::O_ASYNC);
        assert_eq!(owner_after.expect("F_GETOWN_EX"), owner);
    }

    #[test]
    fn leaves_an_end_alone_when_it_cannot_tell_which_file_criu_switched() {
        let pty = raw_pty();
        let dir = tempfile::tempdir().expect("tempdir");
        write_pty_images(dir.path(), &pty);
        // A second open file of the slave that was non-blocking at dump time.
        let mut files = images::read_entries::<FileEntry>(&dir.path().join("files.img"), FILES_MAGIC).expect("files");
        let slave_id = pty.index << 1;
        let flags = (libc::O_RDWR | libc::O_NONBLOCK) as u32;
        files.push(FileEntry {
            r#type: FdTypes::Tty as i32,
            id: 9,
            tty: Some(TtyFileEntry { id: 9, tty_info_id: slave_id, flags }),
        });
        write_image(
            &dir.path().join("files.img"),
            FILES_MAGIC,
            &files.iter().map(|f| f.encode_to_vec()).collect::<Vec<_>>(),
        );
        criu_unblock(&pty.master);
        criu_unblock(&pty.slave);
        let done = write_back_tty_data(dir.path(), &[std::process::id() as i32]).expect("reblock");
        assert_eq!(done.reblocked.iter().map(|r| r.end).collect::<Vec<_>>(), [PtyEnd::Master]);
        assert_eq!(status(&pty.slave), libc::O_NONBLOCK);
    }

    #[test]
    fn classifies_pty_devices() {
        assert_eq!(classify(libc::makedev(5, 2)), Some((PtyEnd::Master, None)));
        assert_eq!(classify(libc::makedev(136, 7)), Some((PtyEnd::Slave, Some(7))));
        assert_eq!(classify(libc::makedev(136, 300)), Some((PtyEnd::Slave, Some(300))));
        assert_eq!(classify(libc::makedev(1, 3)), None);
        assert_eq!(classify(libc::makedev(5, 0)), None);
        assert_eq!(classify(libc::makedev(4, 1)), None);
    }
}
