//! CPU twin of kernels/mma_probe.cu: one 16 x 16 x 8 product of bf16 / fp16 bit patterns,
//! the exact products summed in f64 and rounded once to fp32 (what an IEEE dot product
//! with an exact accumulator gives; the tensor cores' own accumulation may differ in the
//! last bits of fp32), and two models of that accumulation (`MmaSum`), so a test can say
//! which one a device follows.
use crate::backend::Precision;

/// How the 16 products of one output of an m16n8k16 product (and its C, here 0) are added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaSum {
    /// Exactly, rounded once to fp32 (the reference).
    Exact,
    /// In fp32, k = 0 .. 15 in order, then added to C: what the CPU twins of the
    /// tensor-core kernels compute, and the CPU emulator's mma.sync by default.
    Sequential,
    /// As those who measured tensor cores describe them (Fasi, Higham, Mikaitis, Pranesh,
    /// PeerJ CS 2021; Khattak, Mikaitis 2025): the products, `group` at a time, and the
    /// running C aligned to the largest, each cut toward zero 24 + `extra` bits below that
    /// one's leading bit, added exactly, the sum cut toward zero to fp32 (the next group's
    /// C). The reported generations differ in `group` and `extra`; `TRUNCATING` (16, 0),
    /// the least accurate, is the emulator's CUDA_EMU_MMA=truncate
    /// (tests/cuda_emu/mma_model.h emu_dot_truncated).
    Truncating { group: usize, extra: i32 },
}

/// The truncating accumulation the CPU emulator models.
pub const TRUNCATING: MmaSum = MmaSum::Truncating { group: 16, extra: 0 };

/// c [16 x 8] = a [16 x 16] b [16 x 8], all row-major, a and b 16-bit bit patterns of `p`.
pub fn mma_probe(a: &[u16], b: &[u16], p: Precision) -> Vec<f32> {
    mma_probe_as(a, b, p, MmaSum::Exact)
}

/// The same product, its sums formed as `how` says.
pub fn mma_probe_as(a: &[u16], b: &[u16], p: Precision, how: MmaSum) -> Vec<f32> {
    assert!(a.len() >= 256 && b.len() >= 128, "mma_probe: a 16 x 16, b 16 x 8");
    let v = |x: u16| -> f64 {
        match p {
            Precision::Bf16 => half::bf16::from_bits(x).to_f64(),
            Precision::Fp16 => half::f16::from_bits(x).to_f64(),
            Precision::Fp32 => panic!("mma_probe: 16-bit inputs only"),
        }
    };
    let mut c = vec![0f32; 128];
    for i in 0..16 {
        for j in 0..8 {
            // each product of two 16-bit values is exact in f64 (and in f32)
            let t: Vec<f64> = (0..16).map(|k| v(a[i * 16 + k]) * v(b[k * 8 + j])).collect();
            c[i * 8 + j] = match how {
                MmaSum::Exact => t.iter().sum::<f64>() as f32,
                MmaSum::Sequential => 0.0 + t.iter().fold(0f32, |s, &x| s + x as f32),
                MmaSum::Truncating { group, extra } => {
                    assert!(group > 0 && 16 % group == 0 && (0..=8).contains(&extra), "{how:?}");
                    t.chunks(group).fold(0.0, |c, g| truncating_sum(c, g, extra))
                }
            };
        }
    }
    c
}

/// `c` plus the exact terms `t` as `MmaSum::Truncating` adds one group.
fn truncating_sum(c: f32, t: &[f64], extra: i32) -> f32 {
    let terms = std::iter::once(c as f64).chain(t.iter().copied());
    if terms.clone().any(|x| !x.is_finite()) {
        return c + t.iter().fold(0f32, |s, &x| s + x as f32);
    }
    // the largest term's binary exponent e: |x| in [2^(e-1), 2^e)
    // (every term is a normal f64: a nonzero product of 16-bit values is at least 2^-266)
    let exponent = |x: f64| ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022;
    let Some(emax) = terms.clone().filter(|&x| x != 0.0).map(exponent).max() else {
        return c + 0.0;
    };
    let lsb = emax - 1 - 23 - extra;
    let scale = 2f64.powi(-lsb);
    let sum: i64 = terms.map(|x| (x * scale).trunc() as i64).sum();
    let exact = sum as f64 / scale; // |sum| < 17 * 2^32: exact
    let r = exact as f32;
    if (r as f64).abs() > exact.abs() {
        // toward zero: one step down in magnitude
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncating_sum_cuts_toward_zero_below_the_largest_term() {
        // 1 + 15 terms of 0.75 * 2^-24: each cut to 0 (below the last kept bit, 2^-23)
        let mut t = vec![1.0f64];
        t.extend([0.75 * 2f64.powi(-24); 15]);
        assert_eq!(truncating_sum(0.0, &t, 0), 1.0);
        // the same terms summed in fp32 in order: 1 + tiny stays 1 each time; exactly:
        // 1 + 11.25 * 2^-24, which rounds to 1 + 12 * 2^-24 (= 1 + 6 ulps)
        let exact: f64 = t.iter().sum();
        assert_eq!(exact as f32, 1.0 + 6.0 * f32::EPSILON);
        // 1.5 * 2^-23 keeps its 2^-23 bit: 1 + 2^-23 (one ulp)
        assert_eq!(truncating_sum(0.0, &[1.0, 1.5 * 2f64.powi(-23)], 0), 1.0 + f32::EPSILON);
        // negative terms are cut toward zero too (not floored): -1 - 1.5 ulp -> -1 - 1 ulp
        assert_eq!(
            truncating_sum(0.0, &[-1.0, -1.5 * 2f64.powi(-23)], 0),
            -1.0 - f32::EPSILON
        );
        // half an ulp of the largest term is dropped, not rounded up
        assert_eq!(truncating_sum(1.0, &[f32::EPSILON as f64 * 0.5], 0), 1.0);
        // and C takes part in the alignment
        assert_eq!(truncating_sum(4.0, &[0.75 * 2f64.powi(-21)], 0), 4.0);
        // with an extra bit, the 2^-24 bit of 1.5 * 2^-24 is kept until the final cut to
        // fp32; two of them carry into the last bit of fp32
        let tiny = 1.5 * 2f64.powi(-24);
        assert_eq!(truncating_sum(0.0, &[1.0, tiny, tiny], 0), 1.0);
        assert_eq!(truncating_sum(0.0, &[1.0, tiny, tiny], 1), 1.0 + f32::EPSILON);
        // groups of 8 cut their sum to fp32 as the next group's C: 1 + 2^-24 + 2^-24 (the
        // extra bit keeps each 2^-24) is 1 + 2^-23 in one group, 1 in two
        let mut t = [0.0f64; 16];
        (t[0], t[1], t[8]) = (1.0, tiny, tiny);
        let by = |group: usize| t.chunks(group).fold(0.0, |c, g| truncating_sum(c, g, 1));
        assert_eq!(by(16), 1.0 + f32::EPSILON);
        assert_eq!(by(8), 1.0);
    }
}
