//! A small sample of a program that calls `phaul migrate` and moves the filesystem itself, as a container manager
//! would with `--fs external`.
//!
//! ```text
//! phaul-external-caller [--answer success|error|unsupported] [--message TEXT] [--on-sync SHELL-COMMAND]
//!                       -- phaul [ARGS...] migrate HTYPE ID [ARGS...]
//! ```
//!
//! It creates a socket pair, starts the given phaul command with one end as descriptor 6 and
//! `--fs external --fs-opt msg-fd=6` appended, and answers each SYNC_FS request: it runs `--on-sync` (if given,
//! with PHAUL_SYNC_ROUND and PHAUL_SYNC_FROZEN set) and answers ERROR if that fails, else what `--answer` says.
//! It exits with phaul's exit status. Messages are `phaul.external.ExternalMessage`, each framed by a 4-byte
//! big-endian length.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use phaul_proto::external::{ExternalMessage, ExternalType};
use phaul_proto::Message;

const MSG_FD: i32 = 6;

fn read_message(r: &mut impl Read) -> io::Result<ExternalMessage> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > 1 << 20 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large"));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    ExternalMessage::decode(buf.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_message(w: &mut impl Write, m: &ExternalMessage) -> io::Result<()> {
    let b = m.encode_to_vec();
    w.write_all(&(b.len() as u32).to_be_bytes())?;
    w.write_all(&b)
}

struct Opts {
    answer: ExternalType,
    message: String,
    on_sync: Option<String>,
    command: Vec<String>,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts { answer: ExternalType::Success, message: String::new(), on_sync: None, command: Vec::new() };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--answer" => {
                o.answer = match args.next().as_deref() {
                    Some("success") => ExternalType::Success,
                    Some("error") => ExternalType::Error,
                    Some("unsupported") => ExternalType::Unsupported,
                    other => return Err(format!("--answer takes success, error or unsupported, not {other:?}")),
                }
            }
            "--message" => o.message = args.next().ok_or("--message needs a value")?,
            "--on-sync" => o.on_sync = Some(args.next().ok_or("--on-sync needs a value")?),
            "--" => {
                o.command = args.collect();
                break;
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.command.is_empty() {
        return Err("give the phaul command after --".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("phaul-external-caller: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("phaul-external-caller: socketpair: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cmd = Command::new(&o.command[0]);
    cmd.args(&o.command[1..]).args(["--fs", "external", "--fs-opt", &format!("msg-fd={MSG_FD}")]);
    let theirs: OwnedFd = theirs.into();
    let child = match theirs.as_fd().try_clone_to_owned().and_then(|fd| {
        use command_fds::{CommandFdExt, FdMapping};
        cmd.fd_mappings(vec![FdMapping { parent_fd: fd, child_fd: MSG_FD }])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        cmd.spawn()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("phaul-external-caller: cannot start {}: {e}", o.command[0]);
            return ExitCode::from(2);
        }
    };
    drop(cmd);
    drop(theirs);
    let mut child = child;
    // Serve requests until phaul closes its end (it is finishing).
    while let Ok(req) = read_message(&mut ours) {
        if req.r#type != ExternalType::SyncFs as i32 {
            eprintln!("phaul-external-caller: unexpected message type {}", req.r#type);
            continue;
        }
        eprintln!(
            "phaul-external-caller: sync round {} ({})",
            req.round,
            if req.frozen { "frozen" } else { "running" }
        );
        let mut reply = ExternalMessage { r#type: o.answer as i32, message: o.message.clone(), ..Default::default() };
        if let Some(sh) = &o.on_sync {
            let st = Command::new("/bin/sh")
                .arg("-c")
                .arg(sh)
                .env("PHAUL_SYNC_ROUND", req.round.to_string())
                .env("PHAUL_SYNC_FROZEN", if req.frozen { "1" } else { "0" })
                .status();
            match st {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    reply = ExternalMessage {
                        r#type: ExternalType::Error as i32,
                        message: format!("the sync command exited with {s}"),
                        ..Default::default()
                    }
                }
                Err(e) => {
                    reply = ExternalMessage {
                        r#type: ExternalType::Error as i32,
                        message: format!("the sync command could not run: {e}"),
                        ..Default::default()
                    }
                }
            }
        }
        if write_message(&mut ours, &reply).is_err() {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("phaul-external-caller: phaul did not finish in time");
                return ExitCode::from(1);
            }
        }
    }
}
