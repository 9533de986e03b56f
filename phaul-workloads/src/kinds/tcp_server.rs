//! `tcp-server`: accepts one TCP connection and answers `ping <n>` lines with `pong <n> <served>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};
use serde_json::{Map, Value};

use super::{record_error, recorded_error};
use crate::line::{format_pong, parse_ping};
use crate::runner::Workload;

#[derive(Debug, Default)]
struct Shared {
    connected: AtomicBool,
    peer_closed: AtomicBool,
    served: AtomicU64,
    peer: Mutex<Option<String>>,
    error: Mutex<Option<String>>,
}

/// The listener (until the one connection arrives) and the serving thread.
#[derive(Debug)]
pub struct TcpServer {
    listening: SocketAddr,
    shared: Arc<Shared>,
}

/// Bind a listening socket with `SO_REUSEADDR`.
fn bind_listener(addr: SocketAddr) -> Result<TcpListener, String> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket() for {addr} failed: {e}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR failed: {e}"))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| format!("bind({addr}) failed: {e}"))?;
    let backlog = Backlog::new(8).map_err(|e| format!("backlog: {e}"))?;
    listen(&fd, backlog).map_err(|e| format!("listen({addr}) failed: {e}"))?;
    Ok(TcpListener::from(fd))
}

/// Serve one connection until the peer closes it.
fn serve(stream: TcpStream, shared: &Shared) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            record_error(&shared.error, format!("cannot clone the connection: {e}"));
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                record_error(&shared.error, format!("read from the connection failed: {e}"));
                break;
            }
        }
        if line.last() != Some(&b'\n') {
            record_error(
                &shared.error,
                format!("peer closed in the middle of a line: {:?}", String::from_utf8_lossy(&line)),
            );
            break;
        }
        let reply = match std::str::from_utf8(&line).map_err(|e| format!("line is not UTF-8: {e}")).and_then(parse_ping)
        {
            Ok(n) => {
                let served = shared.served.fetch_add(1, Ordering::SeqCst) + 1;
                format_pong(n, served)
            }
            Err(e) => {
                record_error(&shared.error, format!("protocol error: {e}"));
                format!("error {e}\n")
            }
        };
        if let Err(e) = writer.write_all(reply.as_bytes()) {
            record_error(&shared.error, format!("write to the connection failed: {e}"));
            break;
        }
    }
    shared.connected.store(false, Ordering::SeqCst);
    shared.peer_closed.store(true, Ordering::SeqCst);
}

impl TcpServer {
    /// Bind `addr` now (so binding errors are reported at start) and accept/serve in a thread.
    pub fn start(addr: SocketAddr) -> Result<TcpServer, String> {
        let listener = bind_listener(addr)?;
        let listening = listener.local_addr().map_err(|e| format!("getsockname failed: {e}"))?;
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tcp-serve".into())
            .spawn(move || {
                let (stream, peer) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) => {
                        record_error(&s.error, format!("accept failed: {e}"));
                        return;
                    }
                };
                // Only one connection is served: close the listener so nothing waits in its queue.
                drop(listener);
                *s.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer.to_string());
                s.connected.store(true, Ordering::SeqCst);
                serve(stream, &s);
            })
            .map_err(|e| format!("cannot spawn serving thread: {e}"))?;
        Ok(TcpServer { listening, shared })
    }
}

impl Workload for TcpServer {
    fn kind(&self) -> &'static str {
        "tcp-server"
    }

    fn check(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn health(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("listening".into(), Value::from(self.listening.to_string()));
        m.insert("connected".into(), Value::from(self.shared.connected.load(Ordering::SeqCst)));
        m.insert("peer_closed".into(), Value::from(self.shared.peer_closed.load(Ordering::SeqCst)));
        m.insert("served".into(), Value::from(self.shared.served.load(Ordering::SeqCst)));
        let peer = self.shared.peer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        m.insert("peer".into(), peer.map_or(Value::Null, Value::from));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::parse_pong;
    use std::io::Read;

    #[test]
    fn serves_one_connection_on_loopback() {
        let mut srv = TcpServer::start("127.0.0.1:0".parse().expect("addr")).expect("start");
        let mut c = TcpStream::connect(srv.listening).expect("connect");
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let mut r = BufReader::new(c.try_clone().expect("clone"));
        for i in 0..3u64 {
            c.write_all(format!("ping {}\n", 10 + i).as_bytes()).expect("send");
            let mut l = String::new();
            r.read_line(&mut l).expect("recv");
            assert_eq!(parse_pong(&l), Ok((10 + i, i + 1)));
        }
        c.write_all(b"bogus\n").expect("send");
        let mut l = String::new();
        r.read_line(&mut l).expect("recv");
        assert!(l.starts_with("error "), "{l}");
        drop(r);
        c.shutdown(std::net::Shutdown::Both).expect("shutdown");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(srv.check().is_err(), "the bogus line is a protocol error");
        assert_eq!(srv.fields()["served"], 3);
    }
}
