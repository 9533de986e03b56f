//! CRIU-friendly test workloads for phaul.
//!
//! The `phaul-workload` binary (see `main.rs`) launches one of the [`kinds`] as pid 1 of a fresh pid
//! namespace. The workload publishes its observable state to `DIR/state.json` (see [`state`]) and answers
//! probes: the test writes a nonce to `DIR/probe` and sends `SIGUSR1`; the workload re-runs its self-check
//! and publishes a state whose `nonce` is the probe's.
//!
//! Everything that can be tested without a process tree (hashing, state rendering, the tcp line protocol, the
//! heartbeat log's checker [`heartbeat::check_log`], the sqlite ack log's [`kinds::sqlite_writer::check_acks`])
//! lives in this library so that `cargo test -p phaul-workloads` covers it.

pub mod hash;
pub mod heartbeat;
pub mod kinds;
pub mod line;
pub mod runner;
pub mod state;
