//! `memory`: a large buffer of deterministic pseudo-random data whose checksum is re-verified on probes.

use serde_json::{Map, Value};

use crate::hash::{checksum_words, fill_words, hex64, MEMORY_SEED};
use crate::runner::Workload;

const WORDS_PER_MIB: usize = (1 << 20) / std::mem::size_of::<u64>();

/// N MiB of pseudo-random bytes (held as u64 words so hashing is word-at-a-time without unsafe casts).
pub struct Memory {
    size_mib: u64,
    buf: Vec<u64>,
    expected: u64,
    actual: u64,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").field("size_mib", &self.size_mib).field("expected", &self.expected).finish()
    }
}

impl Memory {
    /// Allocate and fill `size_mib` MiB, touching every page, and record the checksum.
    pub fn new(size_mib: u64) -> Result<Memory, String> {
        let words = usize::try_from(size_mib)
            .ok()
            .and_then(|m| m.checked_mul(WORDS_PER_MIB))
            .ok_or_else(|| format!("{size_mib} MiB does not fit in memory on this platform"))?;
        let mut buf: Vec<u64> = Vec::new();
        buf.try_reserve_exact(words).map_err(|e| format!("cannot allocate {size_mib} MiB: {e}"))?;
        buf.resize(words, 0);
        fill_words(&mut buf, MEMORY_SEED);
        let expected = checksum_words(&buf);
        Ok(Memory { size_mib, buf, expected, actual: expected })
    }
}

impl Workload for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn check(&mut self) -> Result<(), String> {
        self.actual = checksum_words(&self.buf);
        if self.actual == self.expected {
            Ok(())
        } else {
            Err(format!("memory checksum mismatch: expected {}, actual {}", hex64(self.expected), hex64(self.actual)))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("size_mib".into(), Value::from(self.size_mib));
        m.insert("expected_checksum".into(), Value::from(hex64(self.expected)));
        m.insert("actual_checksum".into(), Value::from(hex64(self.actual)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffer_checks_ok_and_detects_corruption() {
        let mut m = Memory::new(1).expect("1 MiB");
        assert_eq!(m.buf.len() * 8, 1 << 20);
        assert!(m.check().is_ok());
        m.buf[12345] ^= 0x10;
        let err = m.check().expect_err("corruption must be detected");
        assert!(err.contains("mismatch"), "{err}");
        assert_eq!(m.fields()["size_mib"], 1);
    }
}
