//! Fuzz targets for every decoder of bytes that a peer or a file hands phaul (README.md lists them and says how
//! to run them).
//!
//! Each target is a function of the input bytes that feeds them to phaul's own decoder, checks what must hold of
//! whatever it returns, and says whether the decoder accepted the input ([`Outcome`]). A panic (or an abort, an
//! allocation failure, a stack overflow) is a bug. The same functions serve three callers:
//!
//! - the fuzzers: `cargo afl build` (which passes `--cfg fuzzing`) makes each `src/bin/TARGET.rs` an AFL++
//!   persistent-mode harness ([`main`]);
//! - the tests (`cargo test --manifest-path fuzz/Cargo.toml`): the seed corpus and every input under
//!   `regressions/TARGET/` replayed;
//! - a plain `cargo run --bin TARGET -- FILE...`: replays files (a crash input, with its backtrace).

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use phaul_core::engine::server::HANDSHAKE_TIMEOUT;
use phaul_core::hold::tty;
use phaul_core::images::{self, ImageReader, FILES_MAGIC, STATS_MAGIC, TTY_DATA_MAGIC, TTY_INFO_MAGIC};
use phaul_core::journal;
use phaul_core::plugins;
use phaul_core::transport::{Channel, ChannelName};
use phaul_core::wire::{self, WireError};
use phaul_proto::criu::{FileEntry, StatsEntry, TtyDataEntry, TtyInfoEntry};
use phaul_proto::external::{ExternalMessage, ExternalType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{ChannelKind, Decision, Envelope};
use prost::Message;

pub mod seeds;

/// What the decoder made of an input: `Ok` if it accepted it, `Err` with its error message if it refused it.
/// Either is fine; only a panic is a finding.
pub type Outcome = Result<(), String>;

/// A directory of the target's own for the image files it writes (image decoders read files by path).
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> io::Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("phaul-fuzz-").tempdir()?;
        // read_restore_stats reads DIR/stats-restore, read_dump_stats DIR/stats-dump: one input, one write.
        std::os::unix::fs::symlink("stats-dump", dir.path().join("stats-restore"))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// What it feeds the input to.
    pub decoder: &'static str,
    pub run: fn(&Scratch, &[u8]) -> Outcome,
}

/// Every target, by the name of its binary (`src/bin/NAME.rs`), its corpus (`corpus/NAME/`) and its
/// regressions (`regressions/NAME/`).
pub const TARGETS: &[Target] = &[
    Target {
        name: "wire_envelope",
        decoder: "phaul_core::wire::decode_envelope (one frame's payload)",
        run: wire_envelope,
    },
    Target {
        name: "wire_stream",
        decoder: "phaul_core::wire::recv on a Channel (length-prefixed frames)",
        run: wire_stream,
    },
    Target {
        name: "channel_open",
        decoder: "a connection's first frame as `phaul serve` sorts it (wire::recv_by, journal::check_session)",
        run: channel_open,
    },
    Target {
        name: "fs_external",
        decoder: "phaul_fs_external::read_message (framed ExternalMessage)",
        run: fs_external,
    },
    Target {
        name: "plugins_toml",
        decoder: "phaul_core::plugins::parse_plugin_list (plugins.toml)",
        run: plugins_toml,
    },
    Target {
        name: "image_stats",
        decoder: "phaul_core::images: ImageReader, read_dump_stats, read_restore_stats (stats-dump/stats-restore)",
        run: image_stats,
    },
    Target {
        name: "btrfs_stream",
        decoder: "phaul_fs_stream::btrfs_send::StreamCheck (a btrfs send stream, before btrfs receive sees it)",
        run: btrfs_stream,
    },
    Target {
        name: "zfs_begin",
        decoder: "phaul_fs_stream::zfs_send::Gate (a zfs send stream's begin record, before zfs recv sees it)",
        run: zfs_begin,
    },
    Target {
        name: "image_tty",
        decoder: "phaul_core::hold::tty::write_back_tty_data's image reading (tty-data.img, tty-info.img, files.img)",
        run: image_tty,
    },
];

/// The target of that name.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The body of every `src/bin/TARGET.rs`.
///
/// Under `cargo afl build`: the AFL++ persistent loop (a panic aborts, which AFL++ records as a crash; outside
/// afl-fuzz it runs one input from standard input). Otherwise: replays the files (or every file of the directories)
/// named on the command line, or standard input, and prints what the decoder made of each.
pub fn main(name: &str) {
    let Some(t) = target(name) else {
        eprintln!("no fuzz target named {name}");
        std::process::exit(2);
    };
    // Made before the fork server starts, so that every child AFL++ forks shares it.
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot make a scratch directory: {e}");
            std::process::exit(2);
        }
    };
    run_main(t, &scratch);
}

#[cfg(fuzzing)]
fn run_main(t: &'static Target, scratch: &Scratch) {
    let run = t.run;
    afl::fuzz!(|data: &[u8]| {
        let _ = run(scratch, data);
    });
}

#[cfg(not(fuzzing))]
fn run_main(t: &'static Target, scratch: &Scratch) {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        // One input on standard input, as the AFL++ build takes it outside afl-fuzz.
        let mut data = Vec::new();
        if let Err(e) = io::Read::read_to_end(&mut io::stdin(), &mut data) {
            eprintln!("reading standard input: {e}");
            std::process::exit(2);
        }
        match (t.run)(scratch, &data) {
            Ok(()) => println!("accepted"),
            Err(e) => println!("refused: {e}"),
        }
        return;
    }
    for path in files_under(&args) {
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                std::process::exit(2);
            }
        };
        match (t.run)(scratch, &data) {
            Ok(()) => println!("{}: accepted", path.display()),
            Err(e) => println!("{}: refused: {e}", path.display()),
        }
    }
}

/// The files named, and the files directly inside the directories named, sorted per directory.
pub fn files_under(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
                .unwrap_or_default();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// A channel whose peer sent exactly `data` and then closed (a memfd: any length, no writer thread).
fn channel_over(data: &[u8]) -> Channel {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"phaul-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: memfd_create just returned this descriptor, and nothing else owns it.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data).expect("writing the input into a memfd");
    f.seek(SeekFrom::Start(0)).expect("rewinding the memfd");
    Channel::new(ChannelName::Rpc, OwnedFd::from(f))
}

/// One frame's payload (the bytes after the 4-byte length), as `wire::recv` decodes it. A message that decodes
/// must encode again and decode to itself.
pub fn wire_envelope(_: &Scratch, data: &[u8]) -> Outcome {
    let body = wire::decode_envelope(data).map_err(|e| e.to_string())?;
    let _ = wire::body_name(&body);
    let again = Envelope { body: Some(body.clone()) }.encode_to_vec();
    let back = wire::decode_envelope(&again).expect("a re-encoded message decodes");
    assert_eq!(back, body, "a message must decode to itself after encoding");
    Ok(())
}

/// The control channel's read path: `wire::recv` on a [`Channel`] whose peer sent the input and closed it,
/// frame after frame as the reader thread (`wire::spawn_reader`) does, until it fails. Accepted when every frame
/// decoded and the stream ended at a frame boundary.
pub fn wire_stream(_: &Scratch, data: &[u8]) -> Outcome {
    let mut ch = channel_over(data);
    loop {
        let before = ch.counters().1;
        let r = wire::recv(&mut ch);
        let read = ch.counters().1;
        assert!(read <= data.len() as u64, "read {read} bytes of {}", data.len());
        match r {
            Ok(body) => {
                assert!(read >= before + 4, "a frame is at least its length");
                let _ = wire::body_name(&body);
            }
            Err(WireError::Closed { .. }) if read == before && read == data.len() as u64 => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The session ids `journal::check_session` must accept: 32 lowercase hex digits (128 random bits), nothing else
/// (they name journal files).
fn is_session_id(s: &str) -> bool {
    s.len() == 32 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

fn check_session(s: &str) -> Outcome {
    let r = journal::check_session(s);
    assert_eq!(r.is_ok(), is_session_id(s), "check_session({s:?}) = {r:?}");
    r.map_err(|e| {
        let msg = e.to_string();
        // The refused id goes into logs and answers: at most 80 of the peer's characters, quoted and escaped
        // (`{:?}`: at most 10 characters each, `\u{10ffff}`), so no newline or terminal escape of the peer's.
        let n = msg.chars().count();
        assert!(n <= 80 * 10 + 100, "an unbounded error message: {n} characters");
        assert!(!msg.chars().any(char::is_control), "a control character in {msg:?}");
        msg
    })
}

/// A connection whose peer sent `data` and then closed it, as `phaul serve` reads it: one end of a socket pair
/// (`wire::recv_by` bounds its reads with `SO_RCVTIMEO`, which a memfd does not take). What the socket's buffer
/// cannot hold (a few hundred KiB, more than a first frame of any use) is cut off, as if the peer had closed
/// there. Returns the channel and how many bytes of `data` it holds.
fn socket_channel_over(data: &[u8]) -> (Channel, usize) {
    let (reader, mut writer) = UnixStream::pair().expect("a socket pair");
    writer.set_nonblocking(true).expect("a non-blocking writer");
    let mut sent = 0;
    while sent < data.len() {
        match writer.write(&data[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("writing the input into a socket: {e}"),
        }
    }
    drop(writer);
    (Channel::new(ChannelName::Rpc, OwnedFd::from(reader)), sent)
}

/// A new connection's first frame, as `phaul serve` reads it (`wire::recv_by` with its handshake deadline, as
/// `first_frame` does) and sorts it: a `ChannelOpen` (a data channel naming its session and kind), a `Hello` or a
/// `Resolve`, with the session id checked as the journal checks it before a file is named after it. The peer
/// sent everything at once and closed: the read may end in a refusal or `Closed`, never in a timeout or an I/O
/// error.
pub fn channel_open(_: &Scratch, data: &[u8]) -> Outcome {
    let (mut ch, sent) = socket_channel_over(data);
    let r = wire::recv_by(&mut ch, Instant::now() + HANDSHAKE_TIMEOUT);
    let read = ch.counters().1;
    assert!(read <= sent as u64, "read {read} bytes of {sent}");
    let body = match r {
        Ok(body) => body,
        Err(e @ (WireError::Timeout { .. } | WireError::Io { .. })) => {
            panic!("recv_by on a closed peer's {sent} bytes: {e:?}")
        }
        Err(e) => return Err(e.to_string()),
    };
    match body {
        Body::ChannelOpen(o) => {
            check_session(&o.session)?;
            match ChannelKind::try_from(o.kind) {
                Ok(ChannelKind::ChannelMemory | ChannelKind::ChannelFs) => Ok(()),
                _ => Err(format!("a ChannelOpen of channel kind {}", o.kind)),
            }
        }
        Body::Hello(h) => check_session(&h.session),
        Body::Resolve(r) => {
            check_session(&r.session)?;
            let _ = Decision::try_from(r.decision).unwrap_or(Decision::Query);
            Ok(())
        }
        other => Err(format!("its first frame was {}", wire::body_name(&other))),
    }
}

/// What the caller of the `external` filesystem driver answers on its message descriptor: framed
/// `ExternalMessage`s read with `read_message` until the input ends (at least one, as the driver reads one per
/// request). A message read must write and read back to itself.
pub fn fs_external(_: &Scratch, data: &[u8]) -> Outcome {
    let mut r = io::Cursor::new(data);
    loop {
        let m = phaul_fs_external::read_message(&mut r).map_err(|e| e.to_string())?;
        let _ = ExternalType::try_from(m.r#type);
        let mut buf = Vec::new();
        phaul_fs_external::write_message(&mut buf, &m).expect("writing to a Vec");
        // Decoded directly, not by read_message: re-encoding can be a few bytes longer than the peer's encoding
        // (an enum sent as a 5-byte varint goes back as 10), and so over read_message's limit.
        let (len, bytes) = buf.split_at(4);
        assert_eq!(u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize, bytes.len(), "the frame's length");
        let back = ExternalMessage::decode(bytes).expect("a written message decodes");
        assert_eq!(back, m, "a message must decode to itself after writing");
        if r.position() as usize >= data.len() {
            return Ok(());
        }
    }
}

/// The parent UUID a `btrfs_stream` input names when its first byte is odd (the seeds' previous round).
pub const BTRFS_PARENT: [u8; 16] = [9; 16];

/// A btrfs send stream as the btrfs receiver checks it: byte 0 says whether a previous round's subvolume exists
/// (odd: [`BTRFS_PARENT`]), byte 1 the size of the pieces the stream arrives in (1 to 256 bytes), the rest is the
/// stream. Accepted and complete, it must have declared its subvolume; fed again whole, it must get the same verdict.
pub fn btrfs_stream(_: &Scratch, data: &[u8]) -> Outcome {
    use phaul_fs_stream::btrfs_send::StreamCheck;
    let (head, stream) = data.split_at(data.len().min(2));
    let parent = (head.first().copied().unwrap_or(0) & 1 == 1).then_some(BTRFS_PARENT);
    let piece = usize::from(head.get(1).copied().unwrap_or(0)) + 1;
    let mut pieces = StreamCheck::new(parent);
    let by_pieces = stream.chunks(piece).try_for_each(|c| pieces.feed(c));
    let mut whole = StreamCheck::new(parent);
    let at_once = whole.feed(stream);
    assert_eq!(by_pieces.is_ok(), at_once.is_ok(), "the verdict depends on how the stream was cut");
    by_pieces?;
    if pieces.complete() {
        assert!(pieces.own_uuid().is_some(), "a complete stream without its subvolume");
        Ok(())
    } else {
        Err("the stream did not end".into())
    }
}

/// The GUID a `zfs_begin` input expects its stream to start from when its first byte is odd (the seeds' previous
/// round); 0 (a full stream) otherwise.
pub const ZFS_BASE: u64 = 0x5eed_0000_0000_0001;

/// A zfs send stream as the zfs receiver's gate checks it: byte 0 says whether a previous round's snapshot exists
/// (odd: [`ZFS_BASE`]), byte 1 the size of the pieces the stream arrives in (1 to 256 bytes), the rest is the
/// stream. The gate passes nothing before the begin record is accepted, then everything, unchanged and in order;
/// an accepted record starts from the GUID expected and names a plain snapshot.
pub fn zfs_begin(_: &Scratch, data: &[u8]) -> Outcome {
    use phaul_fs_stream::zfs_send::{plain_name, Gate, BEGIN_LEN};
    let (head, stream) = data.split_at(data.len().min(2));
    let base = if head.first().copied().unwrap_or(0) & 1 == 1 { ZFS_BASE } else { 0 };
    let piece = usize::from(head.get(1).copied().unwrap_or(0)) + 1;
    let mut gate = Gate::new(base);
    let mut passed = Vec::new();
    let mut verdict = Ok(());
    for c in stream.chunks(piece) {
        match gate.feed(c) {
            Ok(out) => passed.extend_from_slice(&out),
            Err(e) => {
                verdict = Err(e);
                break;
            }
        }
        assert!(gate.begin().is_some() || passed.is_empty(), "bytes passed before the begin record was checked");
    }
    let mut whole = Gate::new(base);
    assert_eq!(whole.feed(stream).is_ok(), verdict.is_ok(), "the verdict depends on how the stream was cut");
    verdict?;
    match gate.begin() {
        Some(b) => {
            assert_eq!(passed, stream, "the gate changed what it passed on");
            assert_eq!(b.from_guid, base, "accepted from another snapshot");
            assert!(b.to_guid != 0 && plain_name(&b.snapshot), "accepted {b:?}");
            Ok(())
        }
        None => {
            assert!(stream.len() < BEGIN_LEN, "a whole begin record left unchecked");
            Err("the stream ended within its begin record".into())
        }
    }
}

/// `plugins.toml`, parsed and checked as `Registry::load` does before it loads any library (its read already
/// refuses a file that is not UTF-8 or is over `MAX_PLUGIN_LIST_BYTES`).
pub fn plugins_toml(_: &Scratch, data: &[u8]) -> Outcome {
    if data.len() as u64 > plugins::MAX_PLUGIN_LIST_BYTES {
        return Err(format!("over {} bytes", plugins::MAX_PLUGIN_LIST_BYTES));
    }
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let config = Path::new("/etc/phaul/plugins.toml");
    match plugins::parse_plugin_list(text, config) {
        Ok(list) => {
            for e in &list.plugins {
                assert!(e.path.is_absolute(), "{} is relative to a file in /etc/phaul", e.path.display());
            }
            Ok(())
        }
        Err(e @ plugins::PluginLoadError::ConfigParse { .. }) => Err(e.to_string()),
        Err(other) => panic!("parsing alone failed otherwise than ConfigParse: {other:?}"),
    }
}

/// A CRIU stats image: the input as `stats-dump` (and `stats-restore`) of an image directory, read by
/// `read_dump_stats`, `read_restore_stats`, and entry by entry (whatever its magic) by an [`ImageReader`].
/// Accepted when either stats reader accepted it.
pub fn image_stats(scratch: &Scratch, data: &[u8]) -> Outcome {
    let dir = scratch.path();
    let path = dir.join("stats-dump");
    std::fs::write(&path, data).expect("writing the input");
    let dump = images::read_dump_stats(dir);
    let restore = images::read_restore_stats(dir);
    if let Ok(mut img) = ImageReader::open(&path) {
        let magic = img.magic();
        let first = img.next_entry::<StatsEntry>();
        if dump.is_ok() || restore.is_ok() {
            assert_eq!(magic, STATS_MAGIC, "stats were read from an image of another kind");
            let first = first.expect("the first entry decoded for the stats reader");
            let first = first.expect("the stats reader found an entry");
            assert_eq!(dump.is_ok(), first.dump.is_some());
            assert_eq!(restore.is_ok(), first.restore.is_some());
        }
        while let Ok(Some(_)) = img.next_entry::<StatsEntry>() {}
    } else {
        assert!(dump.is_err() && restore.is_err(), "stats read from an image that does not open");
    }
    match (dump, restore) {
        (Err(d), Err(_)) => Err(d.to_string()),
        _ => Ok(()),
    }
}

/// The three files of an [`image_tty`] input.
pub const TTY_FILES: [&str; 3] = ["tty-data.img", "tty-info.img", "files.img"];

/// Splits an [`image_tty`] input: a byte whose bits 0, 1, 2 say which of [`TTY_FILES`] exist, the lengths of the
/// first two files (u16, little-endian), then the files back to back (the last takes the rest).
pub fn split_tty_input(data: &[u8]) -> Option<[Option<&[u8]>; 3]> {
    let (head, rest) = data.split_at_checked(5)?;
    let present = head[0];
    let (la, lb) = (u16::from_le_bytes([head[1], head[2]]) as usize, u16::from_le_bytes([head[3], head[4]]) as usize);
    let (a, rest) = rest.split_at(la.min(rest.len()));
    let (b, c) = rest.split_at(lb.min(rest.len()));
    Some([(present & 1 != 0).then_some(a), (present & 2 != 0).then_some(b), (present & 4 != 0).then_some(c)])
}

/// The inverse of [`split_tty_input`], for seeds.
pub fn join_tty_input(files: [Option<&[u8]>; 3]) -> Vec<u8> {
    let mut present = 0u8;
    for (i, f) in files.iter().enumerate() {
        if f.is_some() {
            present |= 1 << i;
        }
    }
    let len = |f: Option<&[u8]>| u16::try_from(f.map_or(0, <[u8]>::len)).expect("a seed file under 64 KiB");
    let mut out = vec![present];
    out.extend_from_slice(&len(files[0]).to_le_bytes());
    out.extend_from_slice(&len(files[1]).to_le_bytes());
    for f in files.iter().flatten() {
        out.extend_from_slice(f);
    }
    out
}

/// A dump's terminal images (tty-data.img, tty-info.img, files.img; see [`split_tty_input`]) read and checked
/// by `write_back_tty_data` as after a failed dump, for a tree of no process (so that nothing of this machine is
/// touched: every check of the images runs, then no descriptor is found to write into), and each read entry by
/// entry by `read_entries`. Accepted when there was nothing to put back.
pub fn image_tty(scratch: &Scratch, data: &[u8]) -> Outcome {
    let files = split_tty_input(data).ok_or("shorter than the 5-byte header")?;
    let dir = scratch.path();
    for (name, content) in TTY_FILES.iter().zip(files) {
        let path = dir.join(name);
        match content {
            Some(c) => std::fs::write(&path, c).expect("writing an image"),
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("removing {}: {e}", path.display()),
            },
        }
    }
    let r = tty::write_back_tty_data(dir, &[]);
    if let Ok(done) = &r {
        assert!(done.is_empty(), "put something back into a tree of no process: {done:?}");
    }
    let _ = images::read_entries::<TtyDataEntry>(&dir.join(TTY_FILES[0]), TTY_DATA_MAGIC);
    let _ = images::read_entries::<TtyInfoEntry>(&dir.join(TTY_FILES[1]), TTY_INFO_MAGIC);
    let _ = images::read_entries::<FileEntry>(&dir.join(TTY_FILES[2]), FILES_MAGIC);
    r.map(|_| ()).map_err(|e| e.to_string())
}
