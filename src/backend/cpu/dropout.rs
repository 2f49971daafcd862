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

/// The dropout of a batch whose first `n_dup` elements are needed twice (the DeepCUT step's
/// forget sequences: views a and b), from one read of its input: out [n + n_dup] =
/// `dropout_fwd` of [inp[..n_dup] | inp[..n_dup] | inp[n_dup..n]], each element with the
/// mask of its place in out, rounded to `rounding`. inp [n].
pub fn dropout_duplicate(out: &mut [f32], inp: &[f32], n_dup: usize, n: usize, d: Dropout, rounding: Precision) {
    assert!(n_dup <= n, "dropout_duplicate: {n_dup} duplicated of {n}");
    let (a, rest) = out[..n + n_dup].split_at_mut(n_dup);
    // view a: out[i] from inp[i]; view b and the rest: out[n_dup + i] from inp[i]
    for (part, src, start) in [(a, &inp[..n_dup], 0usize), (rest, &inp[..n], n_dup)] {
        part.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
            let base = ci * CHUNK;
            if d.is_on() {
                d.fill_factors((start + base) as u64, o);
                for (o, x) in o.iter_mut().zip(&src[base..]) {
                    *o *= x;
                }
            } else {
                o.copy_from_slice(&src[base..base + o.len()]);
            }
            round_in_place(o, rounding);
        });
    }
}

/// Backward of `dropout_duplicate`: dinp [n] (overwritten) = dout [n + n_dup] through the
/// masks, both views' gradients meeting in one: dinp[i] = dout[i] f(i) + dout[n_dup + i]
/// f(n_dup + i) for i < n_dup, dout[n_dup + i] f(n_dup + i) after.
pub fn dropout_duplicate_bwd(dinp: &mut [f32], dout: &[f32], n_dup: usize, n: usize, d: Dropout) {
    assert!(n_dup <= n, "dropout_duplicate_bwd: {n_dup} duplicated of {n}");
    dinp[..n].par_chunks_mut(CHUNK).enumerate().for_each(|(ci, di)| {
        let base = ci * CHUNK;
        let mut fb = vec![1f32; di.len()];
        if d.is_on() {
            d.fill_factors((n_dup + base) as u64, &mut fb);
        }
        for (k, o) in di.iter_mut().enumerate() {
            *o = dout[n_dup + base + k] * fb[k];
        }
        let dup = n_dup.saturating_sub(base).min(di.len());
        if dup > 0 {
            let mut fa = vec![1f32; dup];
            if d.is_on() {
                d.fill_factors(base as u64, &mut fa);
            }
            for k in 0..dup {
                di[k] += dout[base + k] * fa[k];
            }
        }
    });
}
