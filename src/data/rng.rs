//! Portable seeded randomness for data order (splits, shuffles, streams).
//!
//! ChaCha8 is specified bit-for-bit and independent of the platform, and the shuffle
//! and the bounded draw are written here rather than taken from `rand`, whose
//! algorithms may change between versions. So a (seed, purpose, epoch) gives the same
//! order on every machine and with every later build: a resumed run or a re-run of a
//! forget split sees the same sentences.
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a random stream is for; part of the key so that one `--seed` does not give
/// correlated orders to different uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    ForgetSplit = 1,
    Buckets = 2,
    Stream = 3,
    RandomLabels = 4,
    SisaShards = 5,
}

/// A generator keyed by (seed, purpose, epoch): the 32-byte ChaCha key is the three
/// numbers little-endian, so different epochs are independent streams.
pub fn keyed_rng(seed: u64, purpose: Purpose, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(purpose as u64).to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Uniform integer in `0..n` (n >= 1), unbiased (Lemire's multiply with rejection).
pub fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n; // (2^64 - n) mod n
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Fisher-Yates shuffle in place.
pub fn shuffle<T>(rng: &mut ChaCha8Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}
