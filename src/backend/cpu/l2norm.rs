//! Row-wise L2 normalisation, z = x / max(||x||, eps) as torch.nn.functional.normalize.
//! CPU twin of kernels/l2norm.cu.
use rayon::prelude::*;

/// Lower bound on the norm (F.normalize's default eps), so a zero row maps to zero.
pub const L2NORM_EPS: f32 = 1e-12;

/// out[r] = inp[r] / norm[r], norm[r] = max(||inp[r]||, eps) saved for the backward pass.
/// out, inp [m, c]; norm [m]. The sum of squares is taken in f64.
pub fn l2norm_fwd(out: &mut [f32], norm: &mut [f32], inp: &[f32], m: usize, c: usize) {
    out[..m * c]
        .par_chunks_mut(c)
        .zip(norm[..m].par_iter_mut())
        .enumerate()
        .for_each(|(r, (o, nr))| {
            let x = &inp[r * c..(r + 1) * c];
            let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let n = (ss.sqrt() as f32).max(L2NORM_EPS);
            *nr = n;
            let inv = 1.0 / n;
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * inv;
            }
        });
}

/// dinp = (dout - out (out . dout)) / norm (overwritten): the projection of dout onto the
/// tangent space of the unit sphere, scaled by 1/norm. Where the norm was clamped to eps
/// the denominator is a constant, so dinp = dout / eps (as autograd gives for F.normalize).
pub fn l2norm_bwd(dinp: &mut [f32], dout: &[f32], out: &[f32], norm: &[f32], m: usize, c: usize) {
    dinp[..m * c].par_chunks_mut(c).enumerate().for_each(|(r, d)| {
        let (g, z) = (&dout[r * c..(r + 1) * c], &out[r * c..(r + 1) * c]);
        let n = norm[r];
        if n <= L2NORM_EPS {
            for (d, &g) in d.iter_mut().zip(g) {
                *d = g / n;
            }
            return;
        }
        let inv = 1.0 / n;
        let zg: f32 = z.iter().zip(g).map(|(a, b)| a * b).sum();
        for ((d, &g), &z) in d.iter_mut().zip(g).zip(z) {
            *d = (g - z * zg) * inv;
        }
    });
}
