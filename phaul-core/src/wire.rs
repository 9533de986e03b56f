//! phaul's protocol framing: each message is an [`Envelope`] in a frame of a 4-byte big-endian length followed by
//! the encoded message. docs/protocol.md describes the conversation.

use std::io::{self, Read, Write};

use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{Envelope, Failure};
use prost::Message;

use crate::transport::Channel;

/// Largest frame either side accepts. Control messages are small; the largest is CRIU's cpuinfo image.
pub const MAX_FRAME: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the {channel} channel")]
    Closed { channel: &'static str },
    #[error("the peer sent nothing on the {channel} channel for too long; it is presumed dead")]
    Timeout { channel: &'static str },
    #[error("{who} did not answer {what} within {secs} s (the {bound} bound); it is presumed dead or cut off")]
    NoAnswer { who: &'static str, what: String, secs: u64, bound: &'static str },
    #[error("the {channel} channel failed: {source}")]
    Io { channel: &'static str, source: io::Error },
    #[error("the peer sent a {size}-byte frame, over the {MAX_FRAME}-byte limit; it is not speaking phaul's protocol")]
    TooLarge { size: u32 },
    #[error("the peer sent a frame that is not a phaul message ({source}); it is not speaking phaul's protocol")]
    Decode { source: prost::DecodeError },
    #[error("the peer sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("the destination failed: {message}{}", fmt_lines(criu_errors))]
    Remote { message: String, criu_errors: Vec<String> },
}

fn fmt_lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("\n    {l}")).collect()
}

fn io_err(channel: &'static str, e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed { channel },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::Timeout { channel },
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => WireError::Closed { channel },
        _ => WireError::Io { channel, source: e },
    }
}

/// The name of a message, for errors and logs.
pub fn body_name(b: &Body) -> &'static str {
    match b {
        Body::Hello(_) => "Hello",
        Body::HelloReply(_) => "HelloReply",
        Body::CpuCheck(_) => "CpuCheck",
        Body::CpuCheckReply(_) => "CpuCheckReply",
        Body::Setup(_) => "Setup",
        Body::SetupReply(_) => "SetupReply",
        Body::StartRound(_) => "StartRound",
        Body::StartRoundReply(_) => "StartRoundReply",
        Body::EndRound(_) => "EndRound",
        Body::EndRoundReply(_) => "EndRoundReply",
        Body::FsRoundDone(_) => "FsRoundDone",
        Body::FsRoundReply(_) => "FsRoundReply",
        Body::Files(_) => "Files",
        Body::FilesReply(_) => "FilesReply",
        Body::Restore(_) => "Restore",
        Body::RestoreReply(_) => "RestoreReply",
        Body::Start(_) => "Start",
        Body::StartReply(_) => "StartReply",
        Body::Finish(_) => "Finish",
        Body::FinishReply(_) => "FinishReply",
        Body::Failure(_) => "Failure",
        Body::ChannelOpen(_) => "ChannelOpen",
        Body::Commit(_) => "Commit",
        Body::Committed(_) => "Committed",
        Body::Resolve(_) => "Resolve",
        Body::ResolveReply(_) => "ResolveReply",
        Body::FsRoundStart(_) => "FsRoundStart",
        Body::Working(_) => "Working",
        Body::Preflight(_) => "Preflight",
        Body::PreflightReply(_) => "PreflightReply",
    }
}

/// Writes one message.
pub fn send(ch: &mut Channel, body: Body) -> Result<(), WireError> {
    let name = ch.name().as_str();
    log::trace!("-> {}", body_name(&body));
    let bytes = Envelope { body: Some(body) }.encode_to_vec();
    let len = u32::try_from(bytes.len()).map_err(|_| WireError::TooLarge { size: u32::MAX })?;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { size: len });
    }
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&bytes);
    ch.write_all(&frame).map_err(|e| io_err(name, e))?;
    ch.flush().map_err(|e| io_err(name, e))
}

/// Reads one message. A `Failure` from the peer is returned as a message, not an error.
pub fn recv(ch: &mut Channel) -> Result<Body, WireError> {
    let name = ch.name().as_str();
    let mut len = [0u8; 4];
    ch.read_exact(&mut len).map_err(|e| io_err(name, e))?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { size: len });
    }
    let mut buf = vec![0u8; len as usize];
    ch.read_exact(&mut buf).map_err(|e| io_err(name, e))?;
    let body = decode_envelope(&buf)?;
    log::trace!("<- {}", body_name(&body));
    Ok(body)
}

/// Reads one message, all of it before `deadline` (a peer trickling a byte at a time does not keep the read
/// alive past it).
pub fn recv_by(ch: &mut Channel, deadline: std::time::Instant) -> Result<Body, WireError> {
    let name = ch.name().as_str();
    let mut len = [0u8; 4];
    read_by(ch, &mut len, deadline)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { size: len });
    }
    let mut buf = vec![0u8; len as usize];
    read_by(ch, &mut buf, deadline)?;
    let _ = ch.set_read_timeout(std::time::Duration::ZERO);
    let body = decode_envelope(&buf)?;
    log::trace!("<- {} ({name}, bounded)", body_name(&body));
    Ok(body)
}

fn read_by(ch: &mut Channel, buf: &mut [u8], deadline: std::time::Instant) -> Result<(), WireError> {
    let name = ch.name().as_str();
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(WireError::Timeout { channel: name });
        }
        ch.set_read_timeout(left).map_err(|e| io_err(name, e))?;
        match ch.read(&mut buf[got..]) {
            Ok(0) => return Err(WireError::Closed { channel: name }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(name, e)),
        }
    }
    Ok(())
}

/// Sends a failure report to the peer.
pub fn send_failure(ch: &mut Channel, message: String, criu_errors: Vec<String>) -> Result<(), WireError> {
    send(ch, Body::Failure(Failure { message, criu_errors, aborted: false }))
}

/// Decodes one frame's payload (the bytes after the length): what [`recv`] does after reading them. Exposed for
/// the fuzz targets.
pub fn decode_envelope(buf: &[u8]) -> Result<Body, WireError> {
    let env = Envelope::decode(buf).map_err(|source| WireError::Decode { source })?;
    env.body.ok_or(WireError::Decode { source: prost::DecodeError::new("an envelope with no message in it") })
}

/// Reads frames on `ch` on a thread of its own and hands each to `sink`, with the bytes read so far, until the
/// channel closes or fails (the error is handed over last) or `sink` returns false. Lets the engine bound every
/// wait with a deadline and see what the peer sends unasked while it is busy elsewhere (inside a CRIU request).
pub fn spawn_reader(
    mut ch: Channel,
    mut sink: impl FnMut(Result<Body, WireError>, u64) -> bool + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        let r = recv(&mut ch);
        let end = r.is_err();
        if !sink(r, ch.counters().1) || end {
            return;
        }
    })
}

/// Sends a request and returns the reply; a `Failure` reply becomes [`WireError::Remote`].
pub fn request(ch: &mut Channel, body: Body) -> Result<Body, WireError> {
    send(ch, body)?;
    match recv(ch)? {
        Body::Failure(f) => Err(WireError::Remote { message: f.message, criu_errors: f.criu_errors }),
        other => Ok(other),
    }
}

/// Extracts an expected reply variant or fails with [`WireError::Unexpected`].
#[macro_export]
macro_rules! expect_reply {
    ($body:expr, $variant:ident) => {
        match $body {
            phaul_proto::wire::envelope::Body::$variant(v) => Ok(v),
            other => Err($crate::wire::WireError::Unexpected {
                expected: stringify!($variant),
                got: $crate::wire::body_name(&other),
            }),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ChannelName;
    use phaul_proto::wire::{Hello, SetupReply};

    fn pair() -> (Channel, Channel) {
        let (a, b) = crate::sys::stream_pair().expect("socketpair");
        (Channel::new(ChannelName::Rpc, a), Channel::new(ChannelName::Rpc, b))
    }

    #[test]
    fn round_trip_and_counters() {
        let (mut a, mut b) = pair();
        send(&mut a, Body::Hello(Hello { protocol_version: 7, session: "s".into(), ..Default::default() }))
            .expect("send");
        match recv(&mut b).expect("recv") {
            Body::Hello(h) => {
                assert_eq!(h.protocol_version, 7);
                assert_eq!(h.session, "s");
            }
            other => panic!("got {}", body_name(&other)),
        }
        assert_eq!(a.counters().0, b.counters().1);
        assert!(a.counters().0 > 4);
    }

    #[test]
    fn oversized_frame_is_refused() {
        let (mut a, mut b) = pair();
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).expect("write");
        assert!(matches!(recv(&mut b), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_not_a_message() {
        let (mut a, mut b) = pair();
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).expect("write");
        assert!(matches!(recv(&mut b), Err(WireError::Decode { .. })));
    }

    #[test]
    fn failure_reply_becomes_remote_error() {
        let (mut a, mut b) = pair();
        let t = std::thread::spawn(move || {
            let _ = recv(&mut b);
            send_failure(&mut b, "no such host type".into(), vec!["Error (x): y".into()]).expect("send");
        });
        let r = request(&mut a, Body::SetupReply(SetupReply::default()));
        t.join().expect("join");
        match r {
            Err(WireError::Remote { message, criu_errors }) => {
                assert_eq!(message, "no such host type");
                assert_eq!(criu_errors.len(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn closed_peer_is_reported() {
        let (mut a, b) = pair();
        drop(b);
        assert!(matches!(recv(&mut a), Err(WireError::Closed { .. })));
    }
}
