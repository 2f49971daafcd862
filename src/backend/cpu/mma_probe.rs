//! CPU twin of kernels/mma_probe.cu: one 16 x 16 x 8 product of bf16 / fp16 bit patterns,
//! the exact products summed in f64 and rounded once to fp32 (what an IEEE dot product
//! with an exact accumulator gives; the tensor cores' own accumulation may differ in the
//! last bits of fp32).
use crate::backend::Precision;

/// c [16 x 8] = a [16 x 16] b [16 x 8], all row-major, a and b 16-bit bit patterns of `p`.
pub fn mma_probe(a: &[u16], b: &[u16], p: Precision) -> Vec<f32> {
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
            c[i * 8 + j] = (0..16).map(|k| v(a[i * 16 + k]) * v(b[k * 8 + j])).sum::<f64>() as f32;
        }
    }
    c
}
