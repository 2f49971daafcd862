//! Dropout from Philox counters: the mask is a function of (seed, stream, element index),
//! so backward regenerates it instead of storing it. CPU twin of kernels/dropout.cu.
use super::quantize::round_in_place;
use crate::backend::philox::Dropout;
use crate::backend::Precision;
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// out = inp * mask / (1-p), rounded to `rounding` (a copy when p = 0).
pub fn dropout_fwd(out: &mut [f32], inp: &[f32], n: usize, d: Dropout, rounding: Precision) {
    out[..n].par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let base = ci * CHUNK;
        if d.is_on() {
            d.fill_factors(base as u64, o);
            for (o, x) in o.iter_mut().zip(&inp[base..]) {
                *o *= x;
            }
        } else {
            o.copy_from_slice(&inp[base..base + o.len()]);
        }
        round_in_place(o, rounding);
    });
}

/// dinp = dout * mask / (1-p) with the same mask as the forward pass, rounded to `rounding`.
pub fn dropout_bwd(dinp: &mut [f32], dout: &[f32], n: usize, d: Dropout, rounding: Precision) {
    dropout_fwd(dinp, dout, n, d, rounding)
}

/// Both dropout views of the forget rows from one read of their input:
/// out[..n] = inp * factor(i), out[n..2n] = inp * factor(n + i), i.e. `dropout_fwd` over
/// [inp | inp] (view b's elements follow view a's, as in the batch [forget a | forget b |
/// retain]). out [2n], inp [n].
pub fn dropout_duplicate(out: &mut [f32], inp: &[f32], n: usize, d: Dropout) {
    let (a, b) = out[..2 * n].split_at_mut(n);
    for (view, start) in [(a, 0usize), (b, n)] {
        view.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
            let base = ci * CHUNK;
            d.fill_factors((start + base) as u64, o);
            for (o, x) in o.iter_mut().zip(&inp[base..]) {
                *o *= x;
            }
        });
    }
}

/// Backward of `dropout_duplicate`: dinp[i] = dout[i] * factor(i) + dout[n + i] *
/// factor(n + i) (overwritten). dinp [n], dout [2n].
pub fn dropout_duplicate_bwd(dinp: &mut [f32], dout: &[f32], n: usize, d: Dropout) {
    dinp[..n].par_chunks_mut(CHUNK).enumerate().for_each(|(ci, di)| {
        let base = ci * CHUNK;
        let mut fa = vec![0f32; di.len()];
        let mut fb = vec![0f32; di.len()];
        d.fill_factors(base as u64, &mut fa);
        d.fill_factors((n + base) as u64, &mut fb);
        for (k, o) in di.iter_mut().enumerate() {
            *o = dout[base + k] * fa[k] + dout[n + base + k] * fb[k];
        }
    });
}
