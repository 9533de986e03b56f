//! The workload kinds. Each implements [`crate::runner::Workload`].

pub mod counter;
pub mod file_append;
pub mod memory;
pub mod pipes;
pub mod tcp_server;
pub mod threads;
pub mod unix_pair;

use std::sync::Mutex;

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
