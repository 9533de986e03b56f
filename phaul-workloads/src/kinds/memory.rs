//! `memory`: a large buffer of deterministic pseudo-random data whose checksum is re-verified on probes.

use serde_json::{Map, Value};

use crate::hash::{checksum_words, checksum_words_from, hex64, XorShift64, MEMORY_SEED};
use crate::runner::Workload;

const WORDS_PER_MIB: usize = (1 << 20) / std::mem::size_of::<u64>();

/// N MiB of pseudo-random bytes (held as u64 words so hashing is word-at-a-time without unsafe casts).
pub struct Memory {
    size_mib: u64,
    buf: Vec<u64>,
    expected: u64,
    actual: u64,
    /// Pages to dirty per tick, and where the next one is.
    dirty_pages_per_tick: usize,
    cursor: usize,
    /// Growth: words filled so far (the rest of `buf` is allocated but never touched), words added per tick, and
    /// the generator that continues the fill.
    filled: usize,
    grow_words_per_tick: usize,
    rng: XorShift64,
}

/// u64 words in a 4 KiB page.
const WORDS_PER_PAGE: usize = 4096 / std::mem::size_of::<u64>();

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").field("size_mib", &self.size_mib).field("expected", &self.expected).finish()
    }
}

impl Memory {
    /// Allocate and fill `size_mib` MiB, touching every page, and record the checksum.
    pub fn new(size_mib: u64) -> Result<Memory, String> {
        Memory::growing(size_mib, 0, 0)
    }

    /// `size_mib` MiB filled now, growing by `grow_mib_s` MiB per second (touching new pages) up to `grow_max_mib`
    /// more.
    pub fn growing(size_mib: u64, grow_mib_s: u64, grow_max_mib: u64) -> Result<Memory, String> {
        let words_of = |mib: u64| {
            usize::try_from(mib)
                .ok()
                .and_then(|m| m.checked_mul(WORDS_PER_MIB))
                .ok_or_else(|| format!("{mib} MiB does not fit in memory on this platform"))
        };
        let filled = words_of(size_mib)?;
        let total = words_of(size_mib.saturating_add(if grow_mib_s > 0 { grow_max_mib } else { 0 }))?;
        // A zeroed allocation (calloc, fresh pages from the kernel): the part not grown into yet is never touched,
        // so it is not resident and CRIU has nothing of it to dump.
        let mut buf: Vec<u64> = vec![0u64; total];
        let mut rng = XorShift64::new(MEMORY_SEED);
        for w in &mut buf[..filled] {
            *w = rng.next();
        }
        let expected = checksum_words(&buf[..filled]);
        let grow_words_per_tick = (words_of(grow_mib_s)? as f64 * crate::runner::TICK.as_secs_f64()) as usize;
        Ok(Memory {
            size_mib,
            buf,
            expected,
            actual: expected,
            dirty_pages_per_tick: 0,
            cursor: 0,
            filled,
            grow_words_per_tick,
            rng,
        })
    }

    /// Dirty `mib_s` MiB per second from now on (one word per page is rewritten with its own value, which marks
    /// the page dirty for the kernel's tracking while keeping the content, and so the checksum, unchanged).
    pub fn dirtying(mut self, mib_s: u64) -> Memory {
        let per_s = mib_s.saturating_mul(256) as f64; // 4 KiB pages per MiB
        self.dirty_pages_per_tick = (per_s * crate::runner::TICK.as_secs_f64()).round() as usize;
        self
    }
}

impl Workload for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn tick(&mut self) -> Result<(), String> {
        let grow = self.grow_words_per_tick.min(self.buf.len() - self.filled);
        if grow > 0 {
            let (start, end) = (self.filled, self.filled + grow);
            for w in &mut self.buf[start..end] {
                *w = self.rng.next();
            }
            self.expected = checksum_words_from(self.expected, start, &self.buf[start..end]);
            self.filled = end;
        }
        let pages = self.filled / WORDS_PER_PAGE;
        if pages == 0 {
            return Ok(());
        }
        for _ in 0..self.dirty_pages_per_tick.min(pages) {
            let i = self.cursor * WORDS_PER_PAGE;
            // black_box keeps the store of the unchanged value from being optimised away.
            self.buf[i] = std::hint::black_box(self.buf[i]);
            self.cursor = (self.cursor + 1) % pages;
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        self.actual = checksum_words(&self.buf[..self.filled]);
        if self.actual == self.expected {
            Ok(())
        } else {
            Err(format!("memory checksum mismatch: expected {}, actual {}", hex64(self.expected), hex64(self.actual)))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("size_mib".into(), Value::from(self.size_mib));
        m.insert("filled_mib".into(), Value::from((self.filled / WORDS_PER_MIB) as u64));
        m.insert("dirty_pages_per_tick".into(), Value::from(self.dirty_pages_per_tick as u64));
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

    #[test]
    fn growing_extends_the_checksum() {
        let mut m = Memory::growing(1, 40, 3).expect("grow");
        for _ in 0..10 {
            m.tick().expect("tick");
        }
        assert_eq!(m.filled, m.buf.len(), "grew to the cap");
        assert!(m.check().is_ok());
        m.buf[m.filled - 1] ^= 1;
        assert!(m.check().is_err());
    }

    #[test]
    fn dirtying_keeps_the_checksum() {
        let mut m = Memory::new(2).expect("2 MiB").dirtying(40);
        assert_eq!(m.dirty_pages_per_tick, 512);
        for _ in 0..5 {
            m.tick().expect("tick");
        }
        assert!(m.check().is_ok());
    }
}
