//! AdamW (clipping folded into its read of the gradient) and the global gradient norm.
//! CPU twin of kernels/adamw.cu.
use super::simd::multiversion;
use rayon::prelude::*;

/// Elements per partial sum in `sum_squares`. Fixed (not derived from the thread count)
/// so the summation order, and so every bit of the result, is the same on any machine;
/// the CUDA kernel uses the same chunking (one block per chunk, partials summed in order).
pub const REDUCE_CHUNK: usize = 4096;

/// Elements per parallel task of the element-wise ops (any value gives the same result).
const ELEMWISE_CHUNK: usize = 16384;

/// One AdamW step with PyTorch semantics (torch.optim.AdamW, single-tensor path), for
/// param, grad, m, v [n]; `step` is 1-based (the step being taken):
/// ```text
/// param *= 1 - lr * wd                      (decoupled weight decay)
/// m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2
/// param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
/// ```
/// The scalar factors are formed in f64 as Python does, then applied in f32. The gradient
/// is read as g = grad * grad_scale (the clipping factor folded in: the same f32 as scaling
/// grad in place first, without the pass over memory).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], n: usize, lr: f32, beta1: f32, beta2: f32, eps: f32,
    weight_decay: f32, step: u64, grad_scale: f32,
) {
    assert!(step >= 1, "adamw: step is 1-based");
    let (lr64, b1, b2) = (lr as f64, beta1 as f64, beta2 as f64);
    let decay = (1.0 - lr64 * weight_decay as f64) as f32;
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2_sqrt = (1.0 - b2.powf(step as f64)).sqrt() as f32;
    let step_size = (lr64 / bc1) as f32;
    let (w1, w2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
    param[..n]
        .par_chunks_mut(ELEMWISE_CHUNK)
        .zip(m[..n].par_chunks_mut(ELEMWISE_CHUNK))
        .zip(v[..n].par_chunks_mut(ELEMWISE_CHUNK))
        .zip(grad[..n].par_chunks(ELEMWISE_CHUNK))
        .for_each(|(((p, m), v), g)| {
            adamw_chunk(p, m, v, g, grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size)
        });
}

multiversion! {
    /// The element loop of [`adamw`] (sqrt and division are correctly rounded in every
    /// vector width, and nothing is contracted: the same bits in every build).
    fn adamw_chunk(
        p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], grad_scale: f32, decay: f32, w1: f32, beta2: f32,
        w2: f32, bc2_sqrt: f32, eps: f32, step_size: f32,
    ) {
        let n = p.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let gi = g[i] * grad_scale;
            p[i] *= decay;
            // torch.lerp with weight < 0.5: start + weight * (end - start)
            m[i] += w1 * (gi - m[i]);
            v[i] = v[i] * beta2 + w2 * gi * gi;
            let denom = v[i].sqrt() / bc2_sqrt + eps;
            p[i] += -step_size * (m[i] / denom);
        }
    }
}

/// sum(x[..n]^2) in f64: fixed chunks of REDUCE_CHUNK, each summed by [`chunk_squares`],
/// then the partials summed in order, so the result does not depend on the thread count.
pub fn sum_squares(x: &[f32], n: usize) -> f64 {
    let partials: Vec<f64> = x[..n].par_chunks(REDUCE_CHUNK).map(chunk_squares).collect();
    partials.iter().sum()
}

/// f64 lanes of [`chunk_squares`]: two AVX-512 registers, so the adds of consecutive
/// elements do not wait on each other (a left-to-right f64 sum runs at one add per add
/// latency, a third of the memory's pace).
const SQ_LANES: usize = 16;

multiversion! {
    /// sum of v^2 over one chunk in f64: element i goes to lane i % SQ_LANES, then the
    /// lanes are added 0, 1, ... The order depends only on the length: the same bits in
    /// every SIMD build and thread count.
    fn chunk_squares(c: &[f32]) -> f64 {
        let mut acc = [0f64; SQ_LANES];
        let mut it = c.chunks_exact(SQ_LANES);
        for ch in &mut it {
            for (a, &v) in acc.iter_mut().zip(ch) {
                *a += v as f64 * v as f64;
            }
        }
        for (a, &v) in acc.iter_mut().zip(it.remainder()) {
            *a += v as f64 * v as f64;
        }
        let mut s = 0f64;
        for a in acc {
            s += a;
        }
        s
    }
}
