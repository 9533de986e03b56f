//! `busy-server`: a TCP server that keeps accepting (backlog 64) and serves every connection on its own
//! thread with the `ping <n>` / `pong <n> <served>` line protocol until the peer closes it.
//!
//! Its clients live outside the workload, so connections are being opened and half-open (still in the
//! listener's SYN or accept queue) while a migration dumps it: CRIU's `--tcp-skip-in-flight` covers those.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};
use serde_json::{Map, Value};

use super::{record_error, recorded_error, serve_ping_pong, Pool};
use crate::runner::Workload;

/// The listen backlog.
pub const BACKLOG: i32 = 64;

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicU64,
    active: AtomicU64,
    closed: AtomicU64,
    served: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The listener's accept thread and the connection threads.
#[derive(Debug)]
pub struct BusyServer {
    listening: SocketAddr,
    shared: Arc<Shared>,
    pool: Pool,
}

fn bind_listener(addr: SocketAddr) -> Result<TcpListener, String> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket() for {addr} failed: {e}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR failed: {e}"))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| format!("bind({addr}) failed: {e}"))?;
    let backlog = Backlog::new(BACKLOG).map_err(|e| format!("backlog: {e}"))?;
    listen(&fd, backlog).map_err(|e| format!("listen({addr}) failed: {e}"))?;
    Ok(TcpListener::from(fd))
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, pool: &Pool) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            // A connection reset while still queued is the client's business, not an error of the server.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::ECONNABORTED) => {
                continue
            }
            Err(e) => {
                record_error(&shared.error, format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.active.fetch_add(1, Ordering::SeqCst);
        let s = Arc::clone(shared);
        let job = move || {
            serve_ping_pong(&stream, &s.served, &s.error, |_| {});
            drop(stream);
            s.active.fetch_sub(1, Ordering::SeqCst);
            s.closed.fetch_add(1, Ordering::SeqCst);
        };
        if let Err(e) = pool.run(job) {
            record_error(&shared.error, e);
        }
    }
}

impl BusyServer {
    /// Bind `addr` now (so binding errors are reported at start) and accept in a thread.
    pub fn start(addr: SocketAddr) -> Result<BusyServer, String> {
        let listener = bind_listener(addr)?;
        let listening = listener.local_addr().map_err(|e| format!("getsockname failed: {e}"))?;
        let shared = Arc::new(Shared::default());
        let pool = Pool::new("busy-conn");
        let s = Arc::clone(&shared);
        let p = pool.clone();
        std::thread::Builder::new()
            .name("busy-accept".into())
            .spawn(move || accept_loop(&listener, &s, &p))
            .map_err(|e| format!("cannot spawn the accept thread: {e}"))?;
        Ok(BusyServer { listening, shared, pool })
    }
}

impl Workload for BusyServer {
    fn kind(&self) -> &'static str {
        "busy-server"
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
        m.insert("accepted".into(), Value::from(self.shared.accepted.load(Ordering::SeqCst)));
        m.insert("active".into(), Value::from(self.shared.active.load(Ordering::SeqCst)));
        m.insert("closed".into(), Value::from(self.shared.closed.load(Ordering::SeqCst)));
        m.insert("served".into(), Value::from(self.shared.served.load(Ordering::SeqCst)));
        m.insert("threads".into(), Value::from(self.pool.threads()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::parse_pong;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    fn ping(c: &TcpStream, n: u64) -> (u64, u64) {
        (&*c).write_all(format!("ping {n}\n").as_bytes()).expect("send");
        let mut l = String::new();
        BufReader::new(c).read_line(&mut l).expect("recv");
        parse_pong(&l).expect("pong")
    }

    #[test]
    fn serves_many_connections_at_once() {
        let mut srv = BusyServer::start("127.0.0.1:0".parse().expect("addr")).expect("start");
        let conns: Vec<TcpStream> = (0..10)
            .map(|_| {
                let c = TcpStream::connect(srv.listening).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                c
            })
            .collect();
        for round in 1..=2u64 {
            for (i, c) in conns.iter().enumerate() {
                assert_eq!(ping(c, i as u64), (i as u64, round));
            }
        }
        let f = srv.fields();
        assert_eq!(f["accepted"], 10);
        assert_eq!(f["active"], 10);
        assert_eq!(f["served"], 20);
        assert_eq!(f["threads"], 10);
        drop(conns);
        let deadline = Instant::now() + Duration::from_secs(5);
        while srv.fields()["closed"] != 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(srv.fields()["active"], 0);
        srv.pool.wait_idle(10);
        // Idle threads are reused.
        let c = TcpStream::connect(srv.listening).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert_eq!(ping(&c, 7), (7, 1));
        assert_eq!(srv.fields()["threads"], 10);
        assert!(srv.check().is_ok());
    }
}
