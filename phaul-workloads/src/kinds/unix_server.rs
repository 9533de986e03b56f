//! `unix-server`: a unix stream socket bound at a path, answering `ping <n>` lines with `pong <n> <served>`.
//!
//! The self-check proves that the path still leads to this very server: it must exist and be a socket, and a
//! ping sent through it from inside the workload must reach this process's listener (the ping carries a
//! token the serving thread recognises) and get its pong. That fails when the path was unlinked, or now names
//! another process's socket (e.g. a restore elsewhere re-created it while this copy still serves the old one).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use super::{record_error, recorded_error, serve_ping_pong, Pool};
use crate::line::parse_pong;
use crate::runner::Workload;

/// How long the self-check waits for its pong.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Self-check pings carry tokens with this bit set, so they never collide with a client's small numbers.
const TOKEN_BIT: u64 = 1 << 63;

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicU64,
    active: AtomicU64,
    served: AtomicU64,
    /// The token the current self-check sends, and whether the serving side saw it.
    expected_token: AtomicU64,
    token_seen: AtomicBool,
    error: Mutex<Option<String>>,
}

/// The listener's accept thread and the connection threads.
#[derive(Debug)]
pub struct UnixServer {
    path: PathBuf,
    shared: Arc<Shared>,
    pool: Pool,
    checks: u64,
}

/// Remove a stale socket at `path`; anything else there is an error (never unlink a user's file).
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("cannot unlink the stale socket {}: {e}", path.display()))
        }
        Ok(_) => Err(format!("{} exists and is not a socket", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot stat {}: {e}", path.display())),
    }
}

impl UnixServer {
    /// Bind and listen at `path` now (so errors are reported at start), then accept in a thread.
    pub fn start(path: &Path) -> Result<UnixServer, String> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        let shared = Arc::new(Shared::default());
        let pool = Pool::new("unix-conn");
        let s = Arc::clone(&shared);
        let p = pool.clone();
        std::thread::Builder::new()
            .name("unix-accept".into())
            .spawn(move || accept_loop(&listener, &s, &p))
            .map_err(|e| format!("cannot spawn the accept thread: {e}"))?;
        Ok(UnixServer { path: path.to_path_buf(), shared, pool, checks: 0 })
    }

    fn ping_through_path(&self, token: u64) -> Result<(), String> {
        let path = self.path.display();
        let stream = UnixStream::connect(&self.path).map_err(|e| format!("connect({path}) failed: {e}"))?;
        stream
            .set_read_timeout(Some(CHECK_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CHECK_TIMEOUT)))
            .map_err(|e| format!("cannot set timeouts on the check connection: {e}"))?;
        (&stream).write_all(format!("ping {token}\n").as_bytes()).map_err(|e| format!("ping via {path}: {e}"))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(|e| format!("no pong via {path}: {e}"))?;
        let (n, _) = parse_pong(&line).map_err(|e| format!("bad answer via {path}: {e}"))?;
        if n != token {
            return Err(format!("the pong via {path} answers {n}, not {token}"));
        }
        Ok(())
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>, pool: &Pool) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
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
            serve_ping_pong(&stream, &s.served, &s.error, |n| {
                if n & TOKEN_BIT != 0 && n == s.expected_token.load(Ordering::SeqCst) {
                    s.token_seen.store(true, Ordering::SeqCst);
                }
            });
            drop(stream);
            s.active.fetch_sub(1, Ordering::SeqCst);
        };
        if let Err(e) = pool.run(job) {
            record_error(&shared.error, e);
        }
    }
}

impl Workload for UnixServer {
    fn kind(&self) -> &'static str {
        "unix-server"
    }

    fn check(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)?;
        let md = std::fs::symlink_metadata(&self.path)
            .map_err(|e| format!("the socket path {} is gone: {e}", self.path.display()))?;
        if !md.file_type().is_socket() {
            return Err(format!("{} is no longer a socket", self.path.display()));
        }
        self.checks += 1;
        let token = TOKEN_BIT | (u64::from(std::process::id()) << 32) | (self.checks & 0xffff_ffff);
        self.shared.token_seen.store(false, Ordering::SeqCst);
        self.shared.expected_token.store(token, Ordering::SeqCst);
        self.ping_through_path(token)?;
        if !self.shared.token_seen.load(Ordering::SeqCst) {
            return Err(format!(
                "{} answers, but it is another process's socket, not this server's",
                self.path.display()
            ));
        }
        Ok(())
    }

    fn health(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("path".into(), Value::from(self.path.display().to_string()));
        m.insert("accepted".into(), Value::from(self.shared.accepted.load(Ordering::SeqCst)));
        m.insert("active".into(), Value::from(self.shared.active.load(Ordering::SeqCst)));
        m.insert("served".into(), Value::from(self.shared.served.load(Ordering::SeqCst)));
        m.insert("self_checks".into(), Value::from(self.checks));
        m.insert("threads".into(), Value::from(self.pool.threads()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_and_checks_through_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sock");
        // A stale socket is replaced.
        drop(UnixListener::bind(&path).expect("stale socket"));
        let mut srv = UnixServer::start(&path).expect("start");
        let c = UnixStream::connect(&path).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut r = BufReader::new(&c);
        for i in 0..3u64 {
            (&c).write_all(format!("ping {i}\n").as_bytes()).expect("send");
            let mut l = String::new();
            r.read_line(&mut l).expect("recv");
            assert_eq!(parse_pong(&l), Ok((i, i + 1)));
        }
        srv.check().expect("self-check passes");
        srv.check().expect("and again");
        assert_eq!(srv.fields()["served"], 5);
        assert_eq!(srv.fields()["self_checks"], 2);

        // Another server now owns the path: the check must notice.
        std::fs::remove_file(&path).expect("unlink");
        let impostor = UnixServer::start(&path).expect("impostor");
        let e = srv.check().expect_err("path served by another socket");
        assert!(e.contains("another process"), "{e}");
        drop(impostor);
        std::fs::remove_file(&path).expect("unlink");
        let e = srv.check().expect_err("path gone");
        assert!(e.contains("gone"), "{e}");
    }

    #[test]
    fn refuses_to_unlink_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        std::fs::write(&path, "data").expect("write");
        assert!(UnixServer::start(&path).is_err());
        assert!(path.exists());
    }
}
