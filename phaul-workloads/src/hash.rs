//! Deterministic pseudo-random fill and a fast 64-bit checksum for the memory workload.

/// The seed of the memory workload's pseudo-random fill; fixed so that runs are comparable.
pub const MEMORY_SEED: u64 = 0x5eed_0f9a_11c0_de01;

/// Marsaglia's xorshift64 generator. The state must never be zero.
#[derive(Debug, Clone)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    /// A generator seeded with `seed` (a zero seed is replaced, since zero is a fixed point).
    pub fn new(seed: u64) -> Self {
        XorShift64 { state: if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed } }
    }

    /// The next pseudo-random value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

/// Fill `words` with the xorshift64 stream seeded with `seed`, writing (and so touching) every page.
pub fn fill_words(words: &mut [u64], seed: u64) {
    let mut rng = XorShift64::new(seed);
    for w in words.iter_mut() {
        *w = rng.next();
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 applied to whole 64-bit words (one xor and one multiply per word, so a GiB hashes in well under
/// a second in release builds). Every step is a bijection of the running hash, so changing any single word
/// always changes the result; the word index is folded in so that swapped words are detected too.
pub fn checksum_words(words: &[u64]) -> u64 {
    let mut h = FNV_OFFSET;
    for (i, &w) in words.iter().enumerate() {
        h = (h ^ w ^ (i as u64)).wrapping_mul(FNV_PRIME);
        h ^= h >> 29;
    }
    h
}

/// A checksum formatted as the state file shows it: 16 lower-case hex digits.
pub fn hex64(v: u64) -> String {
    format!("{v:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_deterministic_and_nonzero() {
        let mut a = XorShift64::new(MEMORY_SEED);
        let mut b = XorShift64::new(MEMORY_SEED);
        for _ in 0..1000 {
            let x = a.next();
            assert_eq!(x, b.next());
            assert_ne!(x, 0);
        }
        let mut z = XorShift64::new(0);
        assert_ne!(z.next(), 0);
    }

    #[test]
    fn xorshift_known_first_value() {
        // x = 1: x ^= x<<13 -> 0x2001; x ^= x>>7 -> 0x2041; x ^= x<<17 -> 0x40822041.
        let mut r = XorShift64::new(1);
        assert_eq!(r.next(), 0x4082_2041);
    }

    #[test]
    fn checksum_detects_single_word_and_swaps() {
        let mut words = vec![0u64; 4096];
        fill_words(&mut words, MEMORY_SEED);
        let base = checksum_words(&words);
        assert_eq!(base, checksum_words(&words));
        for idx in [0usize, 1, 2047, 4095] {
            let mut changed = words.clone();
            changed[idx] ^= 1 << (idx % 64);
            assert_ne!(base, checksum_words(&changed), "flip at {idx} undetected");
        }
        let mut swapped = words.clone();
        swapped.swap(10, 11);
        assert_ne!(base, checksum_words(&swapped));
    }

    #[test]
    fn checksum_of_empty_is_offset_basis() {
        assert_eq!(checksum_words(&[]), FNV_OFFSET);
    }

    #[test]
    fn hex_is_16_digits() {
        assert_eq!(hex64(0xab), "00000000000000ab");
        assert_eq!(hex64(u64::MAX), "ffffffffffffffff");
    }
}
