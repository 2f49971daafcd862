//! Row gather and scatter-add: how the labelled positions of the final hidden states
//! [n, c] become the contrastive embeddings Z [m, c], and how dZ goes back.
//! CPU twin of kernels/rows.cu.
//!
//! Indices are row numbers produced by the host batcher, not user input: an index out of
//! range is a bug and panics here (the GPU kernel does not check).
use rayon::prelude::*;

/// out[r, :] = src[idx[r], :] for r < m (out [m, c], src [n, c], idx [m]).
pub fn gather_rows(out: &mut [f32], src: &[f32], idx: &[i32], m: usize, c: usize) {
    out[..m * c].par_chunks_mut(c).zip(&idx[..m]).for_each(|(o, &i)| {
        let i = usize::try_from(i).expect("gather_rows: negative index");
        o.copy_from_slice(&src[i * c..(i + 1) * c]);
    });
}

/// dst[idx[r], :] += src[r, :] for r < m (dst [n, c], src [m, c]). Accumulates, so dZ can
/// be added next to the classifier head's gradient. Rows are visited in order, which
/// keeps repeated indices deterministic; the work is O(m c), negligible next to the
/// encoder (the GPU kernel gives each destination row one block for the same reason).
pub fn scatter_add_rows(dst: &mut [f32], src: &[f32], idx: &[i32], m: usize, c: usize) {
    for (r, &i) in idx[..m].iter().enumerate() {
        let i = usize::try_from(i).expect("scatter_add_rows: negative index");
        for (d, s) in dst[i * c..(i + 1) * c].iter_mut().zip(&src[r * c..(r + 1) * c]) {
            *d += s;
        }
    }
}
