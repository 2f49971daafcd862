//! Softmax cross-entropy with an ignore index. CPU twin of kernels/softmax_ce.cu.
use crate::backend::IGNORE_INDEX;
use rayon::prelude::*;

/// losses[r] = logsumexp(logits[r]) - logits[r][label], 0 for ignored rows.
pub fn softmax_ce_fwd(losses: &mut [f32], logits: &[f32], labels: &[i32], n: usize, v: usize) {
    losses[..n].par_iter_mut().enumerate().for_each(|(r, l)| {
        let y = labels[r];
        *l = if y == IGNORE_INDEX {
            0.0
        } else {
            let row = &logits[r * v..(r + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
            lse - row[y as usize]
        };
    });
}

/// dlogits[r] = scale * (softmax(logits[r]) - onehot(label)), zero rows when ignored.
pub fn softmax_ce_bwd(dlogits: &mut [f32], logits: &[f32], labels: &[i32], n: usize, v: usize, scale: f32) {
    dlogits[..n * v].par_chunks_mut(v).enumerate().for_each(|(r, d)| {
        let y = labels[r];
        if y == IGNORE_INDEX {
            d.fill(0.0);
            return;
        }
        let row = &logits[r * v..(r + 1) * v];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&x| (x - m).exp()).sum();
        for j in 0..v {
            d[j] = scale * ((row[j] - m).exp() / sum - if j == y as usize { 1.0 } else { 0.0 });
        }
    });
}
