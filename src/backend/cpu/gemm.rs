//! GEMM and bias ops (CPU twin of the cuBLASLt wrapper).
use gemm_crate::Parallelism;
use rayon::prelude::*;

/// c[m,n] = alpha * op(a) op(b) + beta * c (row-major; `ta`/`tb` mean a is stored [k,m],
/// b is stored [n,k]). The `gemm` crate takes arbitrary strides, so transposes cost nothing,
/// and threads a large product over rayon's pool (--threads): its threads split the output
/// into blocks, never a sum over k, so every element is the same products summed in the
/// same order for any thread count (tests below, and tests/threads.rs end to end).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32,
) {
    gemm_with(c, a, b, m, n, k, ta, tb, alpha, beta, Parallelism::Rayon(0));
}

/// [`gemm`] with the threading given: `Rayon(0)` is every thread of the current pool,
/// `None` the calling thread only.
#[allow(clippy::too_many_arguments)]
fn gemm_with(
    c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32,
    par: Parallelism,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm: buffer too small"
    );
    let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
    let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
    let a = View {
        data: a,
        offset: 0,
        row_stride: rsa,
        col_stride: csa,
    };
    let b = View {
        data: b,
        offset: 0,
        row_stride: rsb,
        col_stride: csb,
    };
    strided(c, a, b, m, n, k, alpha, beta, par);
}

/// The one call into the `gemm` crate: c [m, n] dense row-major, a and b strided views
/// whose every element the caller has bounds-checked (or k = 0: nothing is read).
#[allow(clippy::too_many_arguments)]
fn strided(c: &mut [f32], a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32, par: Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    // With k = 0 nothing is read (c = beta c) and the offsets may point past the end.
    let (oa, ob) = if k == 0 { (0, 0) } else { (a.offset, b.offset) };
    // The crate computes dst = alpha_dst * dst + beta_prod * (lhs rhs), reading dst only
    // when asked: with beta 0, c may hold anything (NaN included) and is not read, as
    // BLAS does.
    // SAFETY: every element the strides reach lies inside each slice (the callers check
    // it); c holds m*n elements (asserted by the callers) and does not overlap a or b
    // (a `&mut` borrow next to shared ones).
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.data.as_ptr().add(oa),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(ob),
            b.col_stride as isize,
            b.row_stride as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// out[r, :] += bias
pub fn add_bias(out: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
    out[..rows * cols].par_chunks_mut(cols).for_each(|row| {
        for (o, b) in row.iter_mut().zip(&bias[..cols]) {
            *o += b;
        }
    });
}

/// Rows per partial sum in column reductions. Fixed (not derived from the thread count)
/// so the summation order, and therefore every bit of the result, is the same on any
/// machine and any number of threads.
pub const REDUCE_ROWS: usize = 64;

super::simd::multiversion! {
    /// acc[j] += sum of chunk[r, j] over its rows, rows in order (vectorised across j).
    pub(crate) fn col_sums_chunk(acc: &mut [f32], chunk: &[f32]) {
        for row in chunk.chunks(acc.len()) {
            for (a, x) in acc.iter_mut().zip(row) {
                *a += x;
            }
        }
    }
}

/// dst[j] += sum_r src[r, j], deterministically: fixed row chunks, partials added in order.
pub fn col_sums_into(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    let partials: Vec<Vec<f32>> = src[..rows * cols]
        .par_chunks(REDUCE_ROWS * cols)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            col_sums_chunk(&mut acc, chunk);
            acc
        })
        .collect();
    for p in partials {
        for (d, x) in dst[..cols].iter_mut().zip(&p) {
            *d += x;
        }
    }
}

/// dbias += sum over rows of dout
pub fn bias_grad(dbias: &mut [f32], dout: &[f32], rows: usize, cols: usize) {
    col_sums_into(dbias, dout, rows, cols);
}

/// A read-only strided matrix inside a slice: element (i, j) is
/// `data[offset + i * row_stride + j * col_stride]`. Lets an op multiply blocks of a larger
/// tensor in place (one head of a [b, t, h*d] activation, a transposed block) without
/// copying them out first.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A dense row-major [rows, cols] matrix at `offset`.
    pub fn rows(data: &'a [f32], offset: usize, cols: usize) -> Self {
        View {
            data,
            offset,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (swaps the strides).
    pub fn t(self) -> Self {
        View {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Panics unless every element of a [rows, cols] block lies inside `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "gemm_view: {what} [{rows}, {cols}] reaches element {last} of {}",
            self.data.len()
        );
    }
}

/// c[m,n] (dense, row-major) = alpha * a[m,k] b[k,n] + beta * c, with a and b any strided
/// views. Same kernels (and so the same results) as [`gemm`], on the calling thread only:
/// its callers (attention's per-(sequence, head) products) already run one task per
/// rayon thread.
#[allow(clippy::too_many_arguments)]
pub fn gemm_view(c: &mut [f32], a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    assert!(c.len() >= m * n, "gemm_view: c too small");
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k, "a");
    b.check(k, n, "b");
    strided(c, a, b, m, n, k, alpha, beta, Parallelism::None);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads must not change a bit: 2, 3 and 7 threads against the calling thread alone,
    /// for both orientations, every transpose, beta 0 and not (and a NaN-filled c that beta
    /// 0 must not read), k of 0, 1, 2 (the crate's outer-product path) and odd, one-row and
    /// one-column outputs (its GEMV paths) and sizes past its cache blocks (k > 512) and
    /// its threading threshold.
    #[test]
    fn thread_counts_give_the_same_bits() {
        let mut x = crate::util::Lcg::new(5);
        let mut vals = |len: usize| -> Vec<f32> { (0..len).map(|_| x.next_unit() - 0.5).collect() };
        let pools: Vec<rayon::ThreadPool> = [2, 3, 7]
            .iter()
            .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap())
            .collect();
        for (m, n, k) in [
            (197, 130, 37),
            (130, 197, 37),
            (300, 64, 1),
            (64, 300, 2),
            (64, 300, 0),
            (1, 300, 70),
            (300, 1, 70),
            (129, 129, 65),
            (700, 450, 1100),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for beta in [0.0, 0.75] {
                    let (a, b) = (vals(m * k), vals(k * n));
                    let c0 = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        vals(m * n)
                    };
                    let mut one = c0.clone();
                    gemm_with(&mut one, &a, &b, m, n, k, ta, tb, 1.25, beta, Parallelism::None);
                    assert!(one.iter().all(|v| v.is_finite()), "m {m} n {n} k {k}: not finite");
                    for pool in &pools {
                        let mut many = c0.clone();
                        pool.install(|| gemm(&mut many, &a, &b, m, n, k, ta, tb, 1.25, beta));
                        let same = one.iter().zip(&many).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(
                            same,
                            "m {m} n {n} k {k} ta {ta} tb {tb} beta {beta}: {} threads differ",
                            pool.current_num_threads()
                        );
                    }
                }
            }
        }
    }

    /// The crate's alpha / beta are the other way round from BLAS's: check c = alpha op(a)
    /// op(b) + beta c against sums in f64, with transposes and strided views.
    #[test]
    fn gemm_and_gemm_view_compute_alpha_ab_plus_beta_c() {
        let mut x = crate::util::Lcg::new(9);
        let mut vals = |len: usize| -> Vec<f32> { (0..len).map(|_| x.next_unit() - 0.5).collect() };
        let (m, n, k) = (37, 23, 41);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b, c0) = (vals(m * k), vals(k * n), vals(m * n));
            let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
            let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
            let mut c = c0.clone();
            gemm(&mut c, &a, &b, m, n, k, ta, tb, 1.5, -0.5);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                    let want = 1.5 * dot - 0.5 * c0[i * n + j] as f64;
                    let got = c[i * n + j] as f64;
                    assert!((got - want).abs() < 1e-5, "ta {ta} tb {tb} ({i},{j}): {got} vs {want}");
                }
            }
            // the same product through views of a larger buffer (a at an offset)
            let mut padded = vec![7.0f32; 5];
            padded.extend_from_slice(&a);
            let va = if ta {
                View::rows(&padded, 5, m).t()
            } else {
                View::rows(&padded, 5, k)
            };
            let vb = if tb {
                View::rows(&b, 0, k).t()
            } else {
                View::rows(&b, 0, n)
            };
            let mut cv = c0.clone();
            gemm_view(&mut cv, va, vb, m, n, k, 1.5, -0.5);
            assert!(
                cv.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()),
                "ta {ta} tb {tb}: gemm_view differs from gemm"
            );
        }
    }
}
