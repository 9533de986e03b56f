//! Substreams over phaul's filesystem channel.
//!
//! The filesystem drivers that move data with a real tool on each host (`rsync` client and `rsync --server`,
//! `btrfs send` and `btrfs receive`, `zfs send` and `zfs recv`) share this: one channel for the whole migration,
//! a round made of one or more *sessions* (one per root, per pass), each session a pair of byte streams between
//! the two tools, and a verdict from the receiving side after each session. The channel carries frames:
//!
//! ```text
//! frame   = kind:u8 length:u32-be payload[length]
//! START   1  round:u32 index:u16 pass:u8 final:u8      sender -> receiver: a session begins
//! DATA    2  bytes                                       either way: the session's bytes
//! EOF     3  (empty)                                     either way: this direction of the session is over
//! DONE    4  ok:u8 code:i32 bytes:u64 message:utf8       receiver -> sender: how the receiving tool ended
//! END     5  round:u32 sessions:u32                      sender -> receiver: the round is complete
//! ABORT   6  message:utf8                                sender -> receiver: the round failed on the source
//! ```
//!
//! Each side sends EOF for its own direction once its tool's output ended (at once when the tool writes nothing
//! back), so a session ends cleanly in both directions and the next one starts on a channel in step. What the
//! receiver runs is decided by the receiver alone: START names only the round, the root's index among the roots
//! both sides were given, and a pass number whose meaning the driver fixes.

pub mod btrfs_send;
pub mod kit;
pub mod zfs_send;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// The largest DATA payload written (and accepted: a larger frame is a protocol error).
pub const MAX_FRAME: usize = 256 * 1024;

const START: u8 = 1;
const DATA: u8 = 2;
const EOF: u8 = 3;
const DONE: u8 = 4;
const END: u8 = 5;
const ABORT: u8 = 6;

/// A session's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub round: u32,
    /// Which root (in the order both sides were given them).
    pub index: u16,
    /// What the driver does in this session (its own numbering).
    pub pass: u8,
    pub is_final: bool,
}

/// How the receiving tool ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub ok: bool,
    /// The tool's exit code (-1 when it was killed or could not start).
    pub code: i32,
    /// Bytes the receiving side took in during the session.
    pub bytes: u64,
    /// What went wrong, in the tool's own words where it said something.
    pub message: String,
}

/// What the sender announces next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Session(Start),
    End { round: u32, sessions: u32 },
    Abort(String),
}

/// Bytes moved by one session, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the local tool into the channel.
    pub sent: u64,
    /// From the channel into the local tool.
    pub received: u64,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The filesystem channel, as a driver's own duplicate of the descriptor phaul handed it.
#[derive(Debug)]
pub struct Channel {
    file: File,
}

impl Channel {
    /// Takes a duplicate of the channel (the driver must never close phaul's descriptor). `io_timeout` bounds
    /// every read and write on it when the channel is a socket (a peer that went silent fails the session
    /// instead of hanging it; phaul's own keepalives bound the round as a whole).
    pub fn new(fd: OwnedFd, io_timeout: Option<Duration>) -> Channel {
        if let Some(t) = io_timeout {
            let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, 0);
            // Not a socket (a pipe, in a caller's setup): no timeout, which is only a safety net.
            let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
            let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SendTimeout, &tv);
        }
        Channel { file: File::from(fd) }
    }

    fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        w.write_all(&head)?;
        w.write_all(payload)
    }

    fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<u8> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the filesystem channel")
            } else {
                e
            }
        })?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(protocol(format!("a {len}-byte frame on the filesystem channel is larger than allowed")));
        }
        buf.resize(len, 0);
        r.read_exact(buf)?;
        Ok(head[0])
    }

    /// Sender: a session begins.
    pub fn send_start(&mut self, s: Start) -> io::Result<()> {
        let mut p = Vec::with_capacity(8);
        p.extend_from_slice(&s.round.to_be_bytes());
        p.extend_from_slice(&s.index.to_be_bytes());
        p.push(s.pass);
        p.push(u8::from(s.is_final));
        Self::write_frame(&mut self.file, START, &p)
    }

    /// Sender: the round is complete after `sessions` sessions.
    pub fn send_end(&mut self, round: u32, sessions: u32) -> io::Result<()> {
        let mut p = round.to_be_bytes().to_vec();
        p.extend_from_slice(&sessions.to_be_bytes());
        Self::write_frame(&mut self.file, END, &p)
    }

    /// Sender: the round failed on this side; the receiver stops waiting for it.
    pub fn send_abort(&mut self, message: &str) -> io::Result<()> {
        Self::write_frame(&mut self.file, ABORT, message.as_bytes())
    }

    /// Receiver: what the sender does next.
    pub fn recv_next(&mut self) -> io::Result<Next> {
        let mut buf = Vec::new();
        match Self::read_frame(&mut self.file, &mut buf)? {
            START if buf.len() == 8 => Ok(Next::Session(Start {
                round: u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                index: u16::from_be_bytes([buf[4], buf[5]]),
                pass: buf[6],
                is_final: buf[7] != 0,
            })),
            END if buf.len() == 8 => Ok(Next::End {
                round: u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                sessions: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            }),
            ABORT => Ok(Next::Abort(String::from_utf8_lossy(&buf).into_owned())),
            k => Err(protocol(format!("expected a session or the end of a round, got frame kind {k}"))),
        }
    }

    /// Receiver: how the receiving tool ended.
    pub fn send_done(&mut self, d: &Done) -> io::Result<()> {
        let mut p = vec![u8::from(d.ok)];
        p.extend_from_slice(&d.code.to_be_bytes());
        p.extend_from_slice(&d.bytes.to_be_bytes());
        let msg = d.message.as_bytes();
        p.extend_from_slice(&msg[..msg.len().min(MAX_FRAME - 32)]);
        Self::write_frame(&mut self.file, DONE, &p)
    }

    /// Sender: the receiver's verdict on the session.
    pub fn recv_done(&mut self) -> io::Result<Done> {
        let mut buf = Vec::new();
        match Self::read_frame(&mut self.file, &mut buf)? {
            DONE if buf.len() >= 13 => Ok(Done {
                ok: buf[0] != 0,
                code: i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]),
                bytes: u64::from_be_bytes([buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11], buf[12]]),
                message: String::from_utf8_lossy(&buf[13..]).into_owned(),
            }),
            k => Err(protocol(format!("expected the receiver's verdict, got frame kind {k}"))),
        }
    }

    /// Runs one session's bytes: `from_tool` (the local tool's output, or `None`) goes into the channel, ended by
    /// EOF; what arrives until the peer's EOF goes into `to_tool` (or is discarded when `None`, or once the local
    /// tool stopped reading). Returns when both directions are over. A local tool that stopped reading early is
    /// not an error here (its exit status says why); a broken channel or a protocol error is.
    pub fn relay(
        &mut self,
        to_tool: Option<Box<dyn Write + Send>>,
        from_tool: Option<Box<dyn Read + Send>>,
    ) -> io::Result<Relayed> {
        let mut out = self.file.try_clone()?;
        let pump = std::thread::spawn(move || -> io::Result<u64> {
            let mut sent = 0u64;
            if let Some(mut src) = from_tool {
                let mut buf = vec![0u8; MAX_FRAME];
                loop {
                    let n = match src.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // The tool's output broke: end our direction; its exit status tells the rest.
                        Err(_) => break,
                    };
                    Self::write_frame(&mut out, DATA, &buf[..n])?;
                    sent += n as u64;
                }
            }
            Self::write_frame(&mut out, EOF, &[])?;
            Ok(sent)
        });
        let mut sink = to_tool;
        let mut received = 0u64;
        let mut buf = Vec::new();
        let inbound = loop {
            match Self::read_frame(&mut self.file, &mut buf) {
                Ok(DATA) => {
                    received += buf.len() as u64;
                    if let Some(w) = sink.as_mut() {
                        if w.write_all(&buf).is_err() {
                            // The tool stopped reading: keep the channel in step, drop the rest.
                            sink = None;
                        }
                    }
                }
                Ok(EOF) => break Ok(()),
                Ok(k) => break Err(protocol(format!("expected session data, got frame kind {k}"))),
                Err(e) => break Err(e),
            }
        };
        drop(sink);
        let outbound = pump.join().map_err(|_| io::Error::other("the channel writer thread panicked"))?;
        inbound?;
        Ok(Relayed { sent: outbound?, received })
    }

    /// The channel's descriptor (to poll it).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The last `max` bytes of a tool's stderr, trimmed, for an error message.
pub fn tail(text: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(text);
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (Channel::new(OwnedFd::from(a), Some(Duration::from_secs(10))), Channel::new(OwnedFd::from(b), None))
    }

    #[test]
    fn a_session_round_trips_both_ways() {
        let (mut s, mut r) = pair();
        let recv = std::thread::spawn(move || {
            let Next::Session(st) = r.recv_next().expect("next") else { panic!("not a session") };
            assert_eq!(st, Start { round: 3, index: 1, pass: 2, is_final: true });
            let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            struct W(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
            impl Write for W {
                fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                    self.0.lock().expect("lock").extend_from_slice(b);
                    Ok(b.len())
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            let rel = r
                .relay(Some(Box::new(W(got.clone()))), Some(Box::new(io::Cursor::new(b"pong".to_vec()))))
                .expect("relay");
            assert_eq!(rel.received, 600_000);
            assert_eq!(got.lock().expect("lock").len(), 600_000);
            r.send_done(&Done { ok: true, code: 0, bytes: rel.received, message: String::new() }).expect("done");
            assert_eq!(r.recv_next().expect("end"), Next::End { round: 3, sessions: 1 });
        });
        s.send_start(Start { round: 3, index: 1, pass: 2, is_final: true }).expect("start");
        let data = vec![7u8; 600_000];
        let rel = s.relay(None, Some(Box::new(io::Cursor::new(data)))).expect("relay");
        assert_eq!(rel, Relayed { sent: 600_000, received: 4 });
        let d = s.recv_done().expect("done");
        assert!(d.ok && d.bytes == 600_000);
        s.send_end(3, 1).expect("end");
        recv.join().expect("receiver");
    }

    #[test]
    fn a_closed_peer_is_a_clear_error() {
        let (mut s, r) = pair();
        drop(r);
        let e = s.recv_done().expect_err("peer gone");
        assert!(e.to_string().contains("closed the filesystem channel"), "{e}");
    }

    #[test]
    fn oversized_frames_are_refused() {
        let (mut s, mut r) = pair();
        // The writer blocks once the socket buffer is full; the reader refuses after the header and goes away.
        let w = std::thread::spawn(move || {
            let _ = Channel::write_frame(&mut s.file, DATA, &vec![0u8; MAX_FRAME + 1]);
        });
        let e = r.recv_next().expect_err("too large");
        drop(r);
        w.join().expect("writer");
        assert!(e.to_string().contains("larger than allowed"), "{e}");
    }
}
