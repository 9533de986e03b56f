//! `counter`: only the common fields; the counter ticks every 50 ms.

use serde_json::{Map, Value};

use crate::runner::Workload;

/// The simplest workload.
#[derive(Debug, Default)]
pub struct Counter;

impl Workload for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }

    fn check(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn fields(&self) -> Map<String, Value> {
        Map::new()
    }
}
