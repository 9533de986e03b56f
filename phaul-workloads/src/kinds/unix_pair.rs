//! `unix-pair`: two threads ping-pong a u64 over an AF_UNIX SOCK_STREAM socketpair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use super::{record_error, recorded_error};
use crate::runner::Workload;

const HOP_DELAY: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
struct Shared {
    exchanges: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The two ends of the pair, each driven by its own thread.
#[derive(Debug)]
pub struct UnixPair {
    shared: Arc<Shared>,
}

/// One side: receive a value, require it to be exactly one more than the last value this side sent (or
/// 0 for the side that did not start), and send it back incremented.
fn side(name: &'static str, mut sock: UnixStream, first_send: Option<u64>, shared: Arc<Shared>) {
    let mut last_sent: Option<u64> = None;
    if let Some(v) = first_send {
        if let Err(e) = sock.write_all(&v.to_le_bytes()) {
            record_error(&shared.error, format!("{name}: initial send failed: {e}"));
            return;
        }
        last_sent = Some(v);
    }
    loop {
        let mut buf = [0u8; 8];
        if let Err(e) = sock.read_exact(&mut buf) {
            record_error(&shared.error, format!("{name}: receive failed: {e}"));
            return;
        }
        let v = u64::from_le_bytes(buf);
        let expected = last_sent.map_or(0, |s| s.wrapping_add(1));
        if v != expected {
            record_error(&shared.error, format!("{name}: received {v}, expected {expected}"));
        }
        shared.exchanges.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(HOP_DELAY);
        let next = v.wrapping_add(1);
        if let Err(e) = sock.write_all(&next.to_le_bytes()) {
            record_error(&shared.error, format!("{name}: send failed: {e}"));
            return;
        }
        last_sent = Some(next);
    }
}

impl UnixPair {
    /// Create the socketpair and start both threads; side A sends 0 first.
    pub fn start() -> Result<UnixPair, String> {
        let (a, b) = UnixStream::pair().map_err(|e| format!("socketpair(AF_UNIX, SOCK_STREAM) failed: {e}"))?;
        let shared = Arc::new(Shared::default());
        let sa = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pair-a".into())
            .spawn(move || side("side A", a, Some(0), sa))
            .map_err(|e| format!("cannot spawn thread: {e}"))?;
        let sb = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pair-b".into())
            .spawn(move || side("side B", b, None, sb))
            .map_err(|e| format!("cannot spawn thread: {e}"))?;
        Ok(UnixPair { shared })
    }
}

impl Workload for UnixPair {
    fn kind(&self) -> &'static str {
        "unix-pair"
    }

    fn check(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn health(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("exchanges".into(), Value::from(self.shared.exchanges.load(Ordering::SeqCst)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_runs() {
        let mut p = UnixPair::start().expect("start");
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.check().is_ok());
        let ex = p.fields()["exchanges"].as_u64().expect("exchanges is a number");
        assert!(ex > 3, "only {ex} exchanges");
    }
}
