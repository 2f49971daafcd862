//! LayerNorm with an optional fused residual add (BERT is post-LN:
//! x_out = LN(sublayer(x) + x)). CPU twin of kernels/layernorm.cu.
use super::gemm::REDUCE_ROWS;
use rayon::prelude::*;

/// out = (x - mean) * rstd * weight + bias with x = inp + residual, per row of width c.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], residual: Option<&[f32]>, weight: &[f32],
    bias: &[f32], n: usize, c: usize, eps: f32,
) {
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()))
        .enumerate()
        .for_each(|(r, (o, (mu, rs)))| {
            let x = &inp[r * c..(r + 1) * c];
            // The residual sum is staged in `o` so the statistics see exactly the values
            // the backward pass will recompute.
            match residual {
                Some(res) => {
                    for ((o, a), b) in o.iter_mut().zip(x).zip(&res[r * c..(r + 1) * c]) {
                        *o = a + b;
                    }
                }
                None => o.copy_from_slice(x),
            }
            let m = o.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = o.iter().map(|&v| (v as f64 - m) * (v as f64 - m)).sum::<f64>() / c as f64;
            let s = 1.0 / (var + eps as f64).sqrt();
            *mu = m as f32;
            *rs = s as f32;
            let (m, s) = (m as f32, s as f32);
            for ((o, w), b) in o.iter_mut().zip(weight).zip(bias) {
                *o = (*o - m) * s * w + b;
            }
        });
}

/// Gradient of layernorm_fwd. dinp (overwritten) is the gradient w.r.t. inp + residual,
/// i.e. it flows unchanged to both summands; dweight and dbias are accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dinp: &mut [f32], dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], residual: Option<&[f32]>,
    weight: &[f32], mean: &[f32], rstd: &[f32], n: usize, c: usize,
) {
    // Row-parallel pass: dinp, plus per-chunk partial sums of dweight/dbias that are
    // added in a fixed order afterwards (deterministic for any thread count).
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dinp[..n * c]
        .par_chunks_mut(REDUCE_ROWS * c)
        .enumerate()
        .map(|(chunk, di_chunk)| {
            let mut dw = vec![0f32; c];
            let mut db = vec![0f32; c];
            let mut xhat = vec![0f32; c];
            for (i, di) in di_chunk.chunks_mut(c).enumerate() {
                let r = chunk * REDUCE_ROWS + i;
                let x = &inp[r * c..(r + 1) * c];
                let g = &dout[r * c..(r + 1) * c];
                let (m, s) = (mean[r], rstd[r]);
                for j in 0..c {
                    let v = x[j] + residual.map_or(0.0, |res| res[r * c + j]);
                    xhat[j] = (v - m) * s;
                }
                // dxhat = g * w; dx = s * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
                let mut sum_dxhat = 0f32;
                let mut sum_dxhat_xhat = 0f32;
                for j in 0..c {
                    let dxh = g[j] * weight[j];
                    sum_dxhat += dxh;
                    sum_dxhat_xhat += dxh * xhat[j];
                    dw[j] += g[j] * xhat[j];
                    db[j] += g[j];
                }
                let (a, b) = (sum_dxhat / c as f32, sum_dxhat_xhat / c as f32);
                for j in 0..c {
                    di[j] = s * (g[j] * weight[j] - a - xhat[j] * b);
                }
            }
            (dw, db)
        })
        .collect();
    for (dw, db) in partials {
        for j in 0..c {
            dweight[j] += dw[j];
            dbias[j] += db[j];
        }
    }
}
