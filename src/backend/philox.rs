//! Philox4x32-10, the counter-based generator behind every dropout mask.
//!
//! The CPU and the GPU evaluate the same function of (seed, stream, element index), so a
//! training step with dropout on can be compared between backends, and backward passes
//! regenerate masks instead of storing them (DESIGN.md, "Randomness that both backends
//! share"). Constants are those of Salmon et al. (SC'11), as in cuRAND and PyTorch.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on `ctr` with `key`.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, ctr[0]);
        let (hi1, lo1) = mulhilo(M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// Which dropout mask: `seed` is the run's seed, `stream` packs (step, dropout site)
/// so that every site of every step draws an independent mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element; 0 means identity (evaluation).
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        stream: 0,
    };

    /// Dropout for `site` of training step `step`.
    pub fn new(p: f32, seed: u64, step: u64, site: u32) -> Self {
        Dropout {
            p,
            seed,
            stream: (step << 20) | site as u64,
        }
    }

    pub fn is_on(&self) -> bool {
        self.p > 0.0
    }

    /// Scale applied to kept elements (inverted dropout, as PyTorch).
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// The four uniform u32 words for elements 4*g .. 4*g+3.
    #[inline]
    pub fn words(&self, group: u64) -> [u32; 4] {
        let ctr = [
            group as u32,
            (group >> 32) as u32,
            self.stream as u32,
            (self.stream >> 32) as u32,
        ];
        philox4x32_10(ctr, [self.seed as u32, (self.seed >> 32) as u32])
    }

    /// Whether element `idx` is kept. A 24-bit uniform in [0,1) is compared with p, so
    /// the GPU can reproduce the decision exactly in fp32.
    #[inline]
    pub fn keep(&self, idx: u64) -> bool {
        let w = self.words(idx >> 2)[(idx & 3) as usize];
        let u = (w >> 8) as f32 * (1.0 / 16_777_216.0);
        u >= self.p
    }

    /// Multipliers (0 or 1/(1-p)) of elements start .. start + out.len(), one Philox call
    /// per four elements. After a partial first group (one call), blocks of
    /// [`BLOCK_GROUPS`] calls run lane-parallel ([`fill_block`], vectorised) from wherever
    /// the range starts; a tail of more than [`TAIL_SCALAR_GROUPS`] groups is one more block
    /// cut to length. Same values as [`Dropout::factor`] element by element. (Blocks used to
    /// start at multiples of 64 elements only, so attention rows, which start at multiples
    /// of 4, drew one call at a time unless t was a multiple of 64: the draws were 3% of a
    /// CPU fine-tuning profile, two thirds of it in the scalar path.)
    pub fn fill_factors(&self, start: u64, out: &mut [f32]) {
        if !self.is_on() {
            out.fill(1.0);
            return;
        }
        let scale = self.scale();
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let stream = [self.stream as u32, (self.stream >> 32) as u32];
        // Head: the rest of a group that starts before `start`.
        let head = (((4 - start % 4) % 4) as usize).min(out.len());
        self.fill_scalar(start, &mut out[..head], scale);
        let mut i = head;
        while out.len() - i >= 4 * BLOCK_GROUPS {
            let group = (start + i as u64) >> 2;
            fill_block(group, key, stream, self.p, scale, &mut out[i..i + 4 * BLOCK_GROUPS]);
            i += 4 * BLOCK_GROUPS;
        }
        let rest = out.len() - i;
        if rest > 4 * TAIL_SCALAR_GROUPS {
            let mut block = [0f32; 4 * BLOCK_GROUPS];
            fill_block((start + i as u64) >> 2, key, stream, self.p, scale, &mut block);
            out[i..].copy_from_slice(&block[..rest]);
        } else {
            self.fill_scalar(start + i as u64, &mut out[i..], scale);
        }
    }

    /// `fill_factors` one Philox call per group, for the ragged ends.
    fn fill_scalar(&self, start: u64, out: &mut [f32], scale: f32) {
        let mut group = u64::MAX;
        let mut words = [0u32; 4];
        for (i, o) in out.iter_mut().enumerate() {
            let idx = start + i as u64;
            if idx >> 2 != group {
                group = idx >> 2;
                words = self.words(group);
            }
            let u = (words[(idx & 3) as usize] >> 8) as f32 * (1.0 / 16_777_216.0);
            *o = if u >= self.p { scale } else { 0.0 };
        }
    }

    /// Multiplier for element `idx`: 0 or 1/(1-p).
    #[inline]
    pub fn factor(&self, idx: u64) -> f32 {
        if !self.is_on() {
            1.0
        } else if self.keep(idx) {
            self.scale()
        } else {
            0.0
        }
    }
}

/// Philox calls per lane-parallel block of `fill_factors` (4 elements each).
pub const BLOCK_GROUPS: usize = 16;
/// Tails of up to this many groups take one call each: a whole block costs about three
/// to four single calls (AVX2, 2026-11-30: 77-126 ns a block, ~28 ns a call).
pub const TAIL_SCALAR_GROUPS: usize = 3;

crate::backend::cpu::simd::multiversion! {
    /// Factors of elements 4 group .. 4 (group + BLOCK_GROUPS): BLOCK_GROUPS Philox4x32-10
    /// calls side by side, then the keep decisions. `out` holds 4 * BLOCK_GROUPS floats.
    ///
    /// The counter words live in u64 lanes, as 32-bit values whose upper halves are don't
    /// care: a round needs (M * low 32 bits of c) as a 64-bit product, which is exactly the
    /// vector instruction (pmuludq reads the low halves only), hi = product >> 32 comes out
    /// clean, and lo = the product itself (its upper half is junk nobody reads: a later XOR
    /// and multiply use only low halves, and the outputs are truncated). So a round is two
    /// multiplies, two shifts and two 3-way XORs per lane, with no packing between 32- and
    /// 64-bit lanes. The same words as [`philox4x32_10`], bit for bit (tests).
    fn fill_block(group: u64, key: [u32; 2], stream: [u32; 2], p: f32, scale: f32, out: &mut [f32]) {
        const L: usize = BLOCK_GROUPS;
        const LOW: u64 = 0xFFFF_FFFF;
        let mut c0 = [0u64; L];
        let mut c1 = [0u64; L];
        let mut c2 = [stream[0] as u64; L];
        let mut c3 = [stream[1] as u64; L];
        for l in 0..L {
            let g = group + l as u64;
            c0[l] = g & LOW;
            c1[l] = g >> 32;
        }
        let (mut k0, mut k1) = (key[0], key[1]);
        for round in 0..10 {
            if round > 0 {
                k0 = k0.wrapping_add(W0);
                k1 = k1.wrapping_add(W1);
            }
            let (k0w, k1w) = (k0 as u64, k1 as u64);
            for l in 0..L {
                let p0 = (M0 as u64) * (c0[l] & LOW);
                let p1 = (M1 as u64) * (c2[l] & LOW);
                let n0 = (p1 >> 32) ^ c1[l] ^ k0w;
                let n2 = (p0 >> 32) ^ c3[l] ^ k1w;
                c1[l] = p1;
                c3[l] = p0;
                c0[l] = n0;
                c2[l] = n2;
            }
        }
        let out = &mut out[..4 * L];
        for l in 0..L {
            for (w, c) in [c0[l], c1[l], c2[l], c3[l]].into_iter().enumerate() {
                let u = ((c as u32) >> 8) as f32 * (1.0 / 16_777_216.0);
                out[4 * l + w] = if u >= p { scale } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_from_random123() {
        // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn keep_rate_matches_p() {
        let d = Dropout::new(0.1, 42, 3, 7);
        let n = 200_000;
        let kept = (0..n).filter(|&i| d.keep(i)).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        let other = Dropout::new(0.1, 42, 4, 7);
        let same = (0..1000).filter(|&i| d.keep(i) == other.keep(i)).count();
        assert!(same < 900, "streams must differ");
        // every alignment of start and length against the lane-parallel blocks
        for start in [0u64, 1, 3, 4, 5, 8, 60, 63, 64, 65, (1 << 32) * 4 - 70] {
            for len in [0usize, 1, 3, 12, 13, 16, 17, 37, 64, 65, 77, 130, 300] {
                let mut f = vec![0.0; len];
                d.fill_factors(start, &mut f);
                for (i, x) in f.iter().enumerate() {
                    assert_eq!(*x, d.factor(start + i as u64), "start {start} element {i}");
                }
            }
        }
    }
}
