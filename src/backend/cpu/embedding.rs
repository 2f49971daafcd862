//! Embeddings: word + position + token type. CPU twin of kernels/embedding.cu.
use rayon::prelude::*;

/// out[r] = wte[ids[r]] + wpe[pos[r]] + wtt[types[r]]
#[allow(clippy::too_many_arguments)]
pub fn embedding_fwd(
    out: &mut [f32], ids: &[i32], pos: &[i32], types: &[i32], wte: &[f32], wpe: &[f32], wtt: &[f32], n: usize, c: usize,
) {
    out[..n * c].par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let (i, p, t) = (ids[r] as usize, pos[r] as usize, types[r] as usize);
        let (a, b, d) = (
            &wte[i * c..(i + 1) * c],
            &wpe[p * c..(p + 1) * c],
            &wtt[t * c..(t + 1) * c],
        );
        for j in 0..c {
            o[j] = a[j] + b[j] + d[j];
        }
    });
}

/// Scatter-add of dout into the tables. Rows are visited in order within each column
/// block, so the result is the same for any thread count (the GPU kernel sorts by id
/// for the same reason).
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    dwte: &mut [f32], dwpe: &mut [f32], dwtt: &mut [f32], dout: &[f32], ids: &[i32], pos: &[i32], types: &[i32],
    n: usize, c: usize,
) {
    for (table, idx) in [(dwte, ids), (dwpe, pos), (dwtt, types)] {
        for r in 0..n {
            let i = idx[r] as usize;
            let (dst, src) = (&mut table[i * c..(i + 1) * c], &dout[r * c..(r + 1) * c]);
            for j in 0..c {
                dst[j] += src[j];
            }
        }
    }
}
