//! The `external` filesystem driver: the program that called phaul moves the filesystem itself (a container
//! manager with its own storage backends, say). Over a message descriptor it handed phaul (`--fs-opt msg-fd=N`),
//! phaul asks it to sync the filesystem once while the workload runs and once more after it is frozen. The caller
//! answers SUCCESS, ERROR with a message, or UNSUPPORTED; anything but SUCCESS aborts the migration and the
//! workload keeps running on the source.
//!
//! Options: `msg-fd=N` (required), `timeout=SECONDS` (600): how long to wait for each answer.
//!
//! The messages are `phaul.external.ExternalMessage` (proto/phaul/external.proto in phaul-proto), each framed by a
//! 4-byte big-endian length. This crate also exposes [`read_message`] and [`write_message`] for callers in Rust.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use phaul_abi::{option, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, PluginError, PluginResult};
use phaul_proto::external::{ExternalMessage, ExternalType};
use prost::Message;

/// Largest message accepted from the caller.
const MAX_MESSAGE: u32 = 1 << 20;

/// Writes one framed message.
pub fn write_message(w: &mut impl Write, m: &ExternalMessage) -> io::Result<()> {
    let bytes = m.encode_to_vec();
    w.write_all(&(bytes.len() as u32).to_be_bytes())?;
    w.write_all(&bytes)?;
    w.flush()
}

/// Reads one framed message.
pub fn read_message(r: &mut impl Read) -> io::Result<ExternalMessage> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {len}-byte message is too large")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    ExternalMessage::decode(buf.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

struct External {
    msg: File,
    fd: i32,
    timeout: Duration,
    round: u32,
}

fn sender(args: &FsArgs) -> PluginResult<External> {
    if let Some(kv) = args.options.iter().find(|kv| kv.key.as_str() != "msg-fd" && kv.key.as_str() != "timeout") {
        return Err(PluginError::invalid(format!(
            "the external filesystem driver has no option '{}'; it knows msg-fd and timeout",
            kv.key
        )));
    }
    let fd_text = option(&args.options, "msg-fd").ok_or_else(|| {
        PluginError::invalid(
            "the external filesystem driver needs the caller's message descriptor: pass --fs-opt msg-fd=N",
        )
    })?;
    let fd: i32 = fd_text
        .parse()
        .map_err(|_| PluginError::invalid(format!("--fs-opt msg-fd={fd_text}: not a file descriptor number")))?;
    let timeout = match option(&args.options, "timeout") {
        None => Duration::from_secs(600),
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| PluginError::invalid(format!("--fs-opt timeout={t}: give a whole number of seconds")))?,
        ),
    };
    let owned = phaul_abi::dup_fd(fd)
        .map_err(|e| PluginError::invalid(format!("--fs-opt msg-fd={fd}: {e}; the caller must pass it open")))?;
    Ok(External { msg: File::from(owned), fd, timeout, round: 0 })
}

impl External {
    fn sync(&mut self, frozen: bool) -> PluginResult<FsRound> {
        self.round += 1;
        let req =
            ExternalMessage { r#type: ExternalType::SyncFs as i32, round: self.round, frozen, ..Default::default() };
        write_message(&mut self.msg, &req).map_err(|e| {
            PluginError::failed(format!("cannot ask the caller to sync the filesystem (message fd {}): {e}", self.fd))
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PluginError::failed(format!(
                    "the caller did not answer the filesystem sync request within {} s",
                    self.timeout.as_secs()
                )));
            }
            let ms = u16::try_from(left.as_millis().min(10_000)).unwrap_or(10_000);
            let mut fds = [PollFd::new(self.msg.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(PluginError::failed(format!("waiting for the caller failed: {e}"))),
            }
        }
        let reply = read_message(&mut self.msg).map_err(|e| {
            PluginError::failed(format!("the caller's answer to the filesystem sync could not be read: {e}"))
        })?;
        match ExternalType::try_from(reply.r#type) {
            Ok(ExternalType::Success) => Ok(FsRound::moved(0, 0)),
            Ok(ExternalType::Error) => Err(PluginError::failed(format!(
                "the caller could not sync the filesystem: {}",
                if reply.message.is_empty() { "it gave no reason" } else { reply.message.as_str() }
            ))),
            Ok(ExternalType::Unsupported) => Err(PluginError::unsupported(format!(
                "the caller does not support syncing the filesystem{}; choose another --fs driver",
                if reply.message.is_empty() { String::new() } else { format!(" ({})", reply.message) }
            ))),
            _ => Err(PluginError::failed(format!(
                "the caller answered the filesystem sync with message type {}, not SUCCESS, ERROR or UNSUPPORTED",
                reply.r#type
            ))),
        }
    }
}

impl FsSender for External {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        self.sync(info.is_final)
    }
}

/// The destination has nothing to do: the caller moves the files.
struct NothingToReceive;

impl FsReceiver for NothingToReceive {}

fn receiver(_args: &FsArgs) -> PluginResult<NothingToReceive> {
    Ok(NothingToReceive)
}

phaul_abi::export_fs_driver!(
    name: "external",
    description: "the calling program moves the filesystem when phaul asks over a message fd",
    sender: sender,
    receiver: receiver,
);
