//! Dropout from Philox counters: the mask is a function of (seed, stream, element index),
//! so backward regenerates it instead of storing it. CPU twin of kernels/dropout.cu.
use crate::backend::philox::Dropout;
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// out = inp * mask / (1-p); identity copy when p = 0.
pub fn dropout_fwd(out: &mut [f32], inp: &[f32], n: usize, d: Dropout) {
    if !d.is_on() {
        out[..n].copy_from_slice(&inp[..n]);
        return;
    }
    out[..n].par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let base = ci * CHUNK;
        d.fill_factors(base as u64, o);
        for (o, x) in o.iter_mut().zip(&inp[base..]) {
            *o *= x;
        }
    });
}

/// dinp = dout * mask / (1-p) with the same mask as the forward pass.
pub fn dropout_bwd(dinp: &mut [f32], dout: &[f32], n: usize, d: Dropout) {
    dropout_fwd(dinp, dout, n, d)
}
