//! `pipes`: a three-process tree passing a token around a ring of pipes root → c1 → c2 → root.
//!
//! Every hop adds one: the root sends `t`, c1 passes `t+1`, c2 passes `t+2`, and the root, receiving
//! `t+2`, checks it and sends `t+3`. Each process sleeps ~5 ms before passing the token on.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};
use serde_json::{Map, Value};

use super::{record_error, recorded_error};
use crate::runner::Workload;

const HOP_DELAY: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
struct Shared {
    token: AtomicU64,
    rounds: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The root's view of the ring.
#[derive(Debug)]
pub struct Pipes {
    shared: Arc<Shared>,
    children: Vec<Pid>,
    /// Why a child is gone, once seen (kept so the failure stays visible).
    child_gone: Option<String>,
}

/// A child's whole life: pass the token on, incremented, until the ring breaks.
fn relay(input: OwnedFd, output: OwnedFd) -> ! {
    let mut input = File::from(input);
    let mut output = File::from(output);
    loop {
        let mut buf = [0u8; 8];
        if input.read_exact(&mut buf).is_err() {
            std::process::exit(0);
        }
        let t = u64::from_le_bytes(buf).wrapping_add(1);
        std::thread::sleep(HOP_DELAY);
        if output.write_all(&t.to_le_bytes()).is_err() {
            std::process::exit(0);
        }
    }
}

/// The root's side of the ring, run in a thread of the root.
fn root_ring(to_c1: OwnedFd, from_c2: OwnedFd, shared: Arc<Shared>) {
    let mut out = File::from(to_c1);
    let mut inp = File::from(from_c2);
    let mut sent: u64 = 0;
    if let Err(e) = out.write_all(&sent.to_le_bytes()) {
        record_error(&shared.error, format!("ring: first send failed: {e}"));
        return;
    }
    loop {
        let mut buf = [0u8; 8];
        if let Err(e) = inp.read_exact(&mut buf) {
            record_error(&shared.error, format!("ring broken: receive failed: {e}"));
            return;
        }
        let got = u64::from_le_bytes(buf);
        let expected = sent.wrapping_add(2);
        if got != expected {
            record_error(&shared.error, format!("ring: received token {got}, expected {expected}"));
        }
        shared.token.store(got, Ordering::SeqCst);
        shared.rounds.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(HOP_DELAY);
        sent = got.wrapping_add(1);
        if let Err(e) = out.write_all(&sent.to_le_bytes()) {
            record_error(&shared.error, format!("ring broken: send failed: {e}"));
            return;
        }
    }
}

impl Pipes {
    /// Fork the two children and start the ring. Must be called while the process is single-threaded.
    pub fn start() -> Result<Pipes, String> {
        let (c1_in, root_out) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe2 failed: {e}"))?;
        let (c2_in, c1_out) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe2 failed: {e}"))?;
        let (root_in, c2_out) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe2 failed: {e}"))?;

        // SAFETY: the workload process is single-threaded here (threads are started only after the
        // forks), so the child may run arbitrary code.
        let c1 = match unsafe { fork() }.map_err(|e| format!("fork of ring child 1 failed: {e}"))? {
            ForkResult::Child => {
                drop((root_out, c2_in, c2_out, root_in));
                relay(c1_in, c1_out)
            }
            ForkResult::Parent { child } => child,
        };
        drop((c1_in, c1_out));
        // SAFETY: as above, still single-threaded.
        let c2 = match unsafe { fork() }.map_err(|e| format!("fork of ring child 2 failed: {e}"))? {
            ForkResult::Child => {
                drop((root_out, root_in));
                relay(c2_in, c2_out)
            }
            ForkResult::Parent { child } => child,
        };
        drop((c2_in, c2_out));

        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("ring".into())
            .spawn(move || root_ring(root_out, root_in, s))
            .map_err(|e| format!("cannot spawn ring thread: {e}"))?;
        Ok(Pipes { shared, children: vec![c1, c2], child_gone: None })
    }

    fn check_children(&mut self) -> Result<(), String> {
        if self.child_gone.is_none() {
            for &c in &self.children {
                match waitpid(c, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(status) => {
                        self.child_gone = Some(format!("ring child {c} is gone: {status:?}"));
                        break;
                    }
                    Err(e) => {
                        self.child_gone = Some(format!("waitpid({c}) failed: {e}"));
                        break;
                    }
                }
            }
        }
        match &self.child_gone {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn alive_processes(&self) -> usize {
        if self.child_gone.is_some() {
            1 + self.children.iter().filter(|&&c| nix::sys::signal::kill(c, None).is_ok()).count()
        } else {
            1 + self.children.len()
        }
    }
}

impl Workload for Pipes {
    fn kind(&self) -> &'static str {
        "pipes"
    }

    fn check(&mut self) -> Result<(), String> {
        self.check_children()?;
        recorded_error(&self.shared.error)
    }

    fn health(&mut self) -> Result<(), String> {
        self.check()
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("token".into(), Value::from(self.shared.token.load(Ordering::SeqCst)));
        m.insert("rounds".into(), Value::from(self.shared.rounds.load(Ordering::SeqCst)));
        m.insert("processes".into(), Value::from(self.alive_processes()));
        m
    }
}
