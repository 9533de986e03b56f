//! The workload kinds. Each implements [`crate::runner::Workload`].

pub mod busy_server;
pub mod counter;
pub mod file_append;
pub mod lock_holder;
pub mod memory;
pub mod pipes;
pub mod pty_queue;
pub mod sqlite_writer;
pub mod tcp_server;
pub mod threads;
pub mod tree_writer;
pub mod unix_pair;
pub mod unix_server;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::line::{format_pong, parse_ping};

/// Record the first background error in `slot` (later ones are usually consequences of the first).
pub(crate) fn record_error(slot: &Mutex<Option<String>>, msg: String) {
    // A poisoned lock only means another thread panicked while holding it; the Option is still usable.
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    guard.get_or_insert(msg);
}

/// The recorded background error, if any.
pub(crate) fn recorded_error(slot: &Mutex<Option<String>>) -> Result<(), String> {
    match &*slot.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}

/// Serve `ping <n>` lines on one connection (answering `pong <n> <served on this connection>`) until the peer
/// closes it. Every answered ping increments `served_total` and is passed to `on_ping`; read, write and
/// protocol errors go to `error` (a protocol error is answered `error ...` and serving goes on). Returns the
/// number of pings served on this connection.
pub(crate) fn serve_ping_pong<S>(
    stream: &S,
    served_total: &AtomicU64,
    error: &Mutex<Option<String>>,
    on_ping: impl Fn(u64),
) -> u64
where
    for<'a> &'a S: Read + Write,
{
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let mut served = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return served,
            Ok(_) => {}
            Err(e) => {
                record_error(error, format!("read from a connection failed: {e}"));
                return served;
            }
        }
        if line.last() != Some(&b'\n') {
            record_error(error, format!("peer closed in the middle of a line: {:?}", String::from_utf8_lossy(&line)));
            return served;
        }
        let parsed = std::str::from_utf8(&line).map_err(|e| format!("line is not UTF-8: {e}")).and_then(parse_ping);
        let reply = match parsed {
            Ok(n) => {
                served += 1;
                served_total.fetch_add(1, Ordering::SeqCst);
                on_ping(n);
                format_pong(n, served)
            }
            Err(e) => {
                record_error(error, format!("protocol error: {e}"));
                format!("error {e}\n")
            }
        };
        if let Err(e) = writer.write_all(reply.as_bytes()) {
            record_error(error, format!("write to a connection failed: {e}"));
            return served;
        }
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

#[derive(Default)]
struct PoolInner {
    state: Mutex<PoolState>,
    wake: Condvar,
}

/// Threads that run one job each at a time and never exit: an idle thread takes the next job, and a new
/// thread is spawned only when no idle one is left. Serving each connection on its own thread without
/// threads that come and go (a thread exiting while CRIU seizes the tree is a needless race).
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
    name: &'static str,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).field("threads", &self.threads()).finish()
    }
}

impl Pool {
    /// An empty pool whose threads are called `name-<i>`.
    pub(crate) fn new(name: &'static str) -> Pool {
        Pool { inner: Arc::default(), name }
    }

    /// Threads spawned so far (all still alive: they never exit).
    pub(crate) fn threads(&self) -> usize {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).threads
    }

    /// Threads waiting for a job.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).idle
    }

    /// Wait (at most 5 s) until `n` threads wait for a job.
    #[cfg(test)]
    pub(crate) fn wait_idle(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.idle() != n && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Run `job` on an idle thread, or on a new one if none is idle.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.queue.push_back(Box::new(job));
        if st.idle >= st.queue.len() {
            drop(st);
            self.inner.wake.notify_one();
            return Ok(());
        }
        let index = st.threads;
        st.threads += 1;
        drop(st);
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new().name(format!("{}-{index}", self.name)).spawn(move || loop {
            let job = {
                let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(job) = st.queue.pop_front() {
                        break job;
                    }
                    st.idle += 1;
                    st = inner.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                    st.idle -= 1;
                }
            };
            job();
        });
        if let Err(e) = spawned {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            st.threads -= 1;
            // The job stays queued for the next thread that frees up.
            return Err(format!("cannot spawn a {} thread: {e}", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn pool_reuses_idle_threads_and_grows_when_busy() {
        let pool = Pool::new("test");
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            pool.run(move || {
                let _ = tx.send(i);
            })
            .expect("run");
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(i));
            pool.wait_idle(1);
        }
        assert_eq!(pool.threads(), 1, "sequential jobs share one thread");
        let (block_tx, block_rx) = mpsc::channel::<()>();
        let block_rx = Arc::new(Mutex::new(block_rx));
        for _ in 0..3 {
            let b = Arc::clone(&block_rx);
            let tx = tx.clone();
            pool.run(move || {
                let _ = tx.send(99);
                let _ = b.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(Duration::from_secs(5));
            })
            .expect("run");
        }
        for _ in 0..3 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(99));
        }
        assert_eq!(pool.threads(), 3, "three concurrent jobs need three threads");
        drop(block_tx);
    }
}
