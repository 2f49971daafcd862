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

/// Scatter-add of dout into the tables, walking `order` (`backend::embedding_order`, [3n]):
/// each run of equal indices adds its tokens' rows in token order to its table row, as
/// the GPU kernel does. Runs touch distinct rows, so they run in parallel and any thread
/// count gives the same bits.
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    dwte: &mut [f32], dwpe: &mut [f32], dwtt: &mut [f32], dout: &[f32], ids: &[i32], pos: &[i32], types: &[i32],
    order: &[i32], n: usize, c: usize,
) {
    for (t, (table, idx)) in [(dwte, ids), (dwpe, pos), (dwtt, types)].into_iter().enumerate() {
        let ord = &order[t * n..(t + 1) * n];
        // (table row, first and last+1 position in ord) of every run
        let mut runs = Vec::new();
        let mut k = 0;
        while k < n {
            let key = idx[ord[k] as usize];
            let start = k;
            while k < n && idx[ord[k] as usize] == key {
                k += 1;
            }
            runs.push((key as usize, start, k));
        }
        // the rows of each run, disjoint, handed out in index order
        let mut rows: Vec<&mut [f32]> = Vec::with_capacity(runs.len());
        let mut rest = &mut table[..];
        let mut at = 0;
        for &(key, _, _) in &runs {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((key - at) * c);
            let (row, tail) = tail.split_at_mut(c);
            rows.push(row);
            rest = tail;
            at = key + 1;
        }
        rows.into_par_iter().zip(runs.par_iter()).for_each(|(dst, &(_, a, b))| {
            for &r in &ord[a..b] {
                let src = &dout[r as usize * c..(r as usize + 1) * c];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            }
        });
    }
}
