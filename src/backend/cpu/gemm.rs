//! GEMM and bias ops (CPU twin of the cuBLASLt wrapper).
//!
//! Two GEMM libraries, one picked per machine at the first call ([`kernel`]): on CPUs with
//! AVX-512, matrixmultiply (its AVX-512 kernel: 401-433 GFLOP/s on 2 cores where the `gemm`
//! crate's stable build, AVX2 only, gave 241-258); elsewhere the `gemm` crate (on 2 AVX2
//! cores 167-196 GFLOP/s at the model's shapes against matrixmultiply's 134-174, and
//! 1.14-1.43x on attention's per-head products). BENCHMARKS.md has both measurements.
//! Either way a machine always uses the same one, and threads never change a bit.
use gemm_crate::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Which library computes the CPU GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// matrixmultiply: its own thread pool (at most 4 threads a GEMM), rows split over
    /// rayon's pool above that.
    MatrixMultiply,
    /// The `gemm` crate: threads on rayon's pool.
    GemmCrate,
}

impl Kernel {
    /// The library's name (`devices`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::MatrixMultiply => "matrixmultiply",
            Kernel::GemmCrate => "gemm crate",
        }
    }

    /// The library in words, for the bench's JSON.
    pub fn describe(self) -> &'static str {
        match self {
            Kernel::MatrixMultiply => "matrixmultiply (its AVX-512 / AVX2 kernels, constconf blocking)",
            Kernel::GemmCrate => "gemm crate (AVX2 / FMA kernels; threads on rayon's pool)",
        }
    }
}

/// The library this process uses: `DEEPCUT_CPU_GEMM=matrixmultiply|gemm` if set (for
/// benchmarks and tests), else matrixmultiply where the CPU has AVX-512F, else `gemm`.
pub fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| match std::env::var("DEEPCUT_CPU_GEMM").as_deref() {
        Ok("matrixmultiply") => Kernel::MatrixMultiply,
        Ok("gemm") => Kernel::GemmCrate,
        _ => {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::MatrixMultiply;
            }
            Kernel::GemmCrate
        }
    })
}

/// Rayon threads matrixmultiply's model GEMMs split their rows over; 0 (the default):
/// none, and matrixmultiply threads each GEMM itself. Set by [`configure_threads`].
static SPLIT_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Rows of the output each part of a split GEMM gets at least (a few of matrixmultiply's
/// row blocks, so packing B again per part stays small next to the part's products).
const MIN_SPLIT_ROWS: usize = 64;
/// Split edges fall on multiples of this many rows: a multiple of every register tile
/// height of matrixmultiply's kernels.
const SPLIT_ALIGN: usize = 64;

/// Sets how the model GEMMs use `threads` threads; call before the first GEMM (the CLI
/// does, with --threads or rayon's default). matrixmultiply threads a GEMM over at most 4
/// cores, so up to 4 threads it does the threading; with more, each model GEMM is split
/// into row blocks of its output over rayon's pool, each block one single-threaded
/// matrixmultiply call, so a 16- or 64-core machine uses every core. Every output element
/// is the same products summed in the same order either way: the bits do not change.
pub fn configure_threads(threads: usize) {
    let split = if threads > 4 { threads } else { 0 };
    // matrixmultiply reads this once, at its first threaded GEMM
    std::env::set_var(
        "MATMUL_NUM_THREADS",
        if split > 0 { 1 } else { threads.max(1) }.to_string(),
    );
    SPLIT_THREADS.store(split, Ordering::Relaxed);
}

/// c[m,n] = alpha * op(a) op(b) + beta * c (row-major; `ta`/`tb` mean a is stored [k,m],
/// b is stored [n,k]). Both libraries take arbitrary strides, so transposes cost nothing;
/// both thread by splitting output blocks, never a sum over k, so every element is the
/// same products summed in the same order for any thread count (tests below, and
/// tests/threads.rs end to end).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32,
) {
    match kernel() {
        Kernel::MatrixMultiply => {
            let parts = SPLIT_THREADS
                .load(Ordering::Relaxed)
                .min(m.max(n) / MIN_SPLIT_ROWS)
                .max(1);
            gemm_in_parts(c, a, b, m, n, k, ta, tb, alpha, beta, parts);
        }
        Kernel::GemmCrate => gemm_with(c, a, b, m, n, k, ta, tb, alpha, beta, Parallelism::Rayon(0)),
    }
}

/// [`gemm`] through the `gemm` crate, with the threading given: `Rayon(0)` is every thread of the current pool,
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
    let a = if ta {
        View::rows(a, 0, m).t()
    } else {
        View::rows(a, 0, k)
    };
    let b = if tb {
        View::rows(b, 0, k).t()
    } else {
        View::rows(b, 0, n)
    };
    strided(c, n, a, b, m, n, k, alpha, beta, par);
}

/// The one call into the `gemm` crate: c [m, n] row-major with row stride ldc >= n, a and
/// b strided views whose every element the caller has bounds-checked (or k = 0: nothing
/// is read).
#[allow(clippy::too_many_arguments)]
fn strided(
    c: &mut [f32], ldc: usize, a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32, par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // With k = 0 nothing is read (c = beta c) and the offsets may point past the end.
    let (oa, ob) = if k == 0 { (0, 0) } else { (a.offset, b.offset) };
    // The crate computes dst = alpha_dst * dst + beta_prod * (lhs rhs), reading dst only
    // when asked: with beta 0, c may hold anything (NaN included) and is not read, as
    // BLAS does.
    // SAFETY: every element the strides reach lies inside each slice (the callers check
    // it); c holds (m - 1) ldc + n elements (asserted by the callers) and does not overlap
    // a or b (a `&mut` borrow next to shared ones).
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
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

/// [`gemm`] with the wider side of the output split into `parts` row blocks computed side
/// by side (1: one matrixmultiply call).
#[allow(clippy::too_many_arguments)]
fn gemm_in_parts(
    c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32,
    parts: usize,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm: buffer too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // matrixmultiply packs B (k x n) on one thread and A (m x k) on all of them, so the
    // wider operand goes on the A side: for n > m it computes C^T = B^T A^T into c seen
    // column-major. Every element is still the same products summed in the same order
    // (the kernel's k loop is unchanged, a*b = b*a), so both ways give identical bits.
    // SAFETY: the asserts above bound every index the strides can reach.
    unsafe {
        if n > m {
            sgemm_rows(
                parts,
                n,
                k,
                m,
                alpha,
                (b.as_ptr(), csb, rsb),
                (a.as_ptr(), csa, rsa),
                beta,
                (c.as_mut_ptr(), 1, n as isize),
            );
        } else {
            sgemm_rows(
                parts,
                m,
                k,
                n,
                alpha,
                (a.as_ptr(), rsa, csa),
                (b.as_ptr(), rsb, csb),
                beta,
                (c.as_mut_ptr(), n as isize, 1),
            );
        }
    }
}

/// matrixmultiply's sgemm (C[m, n] = alpha A[m, k] B[k, n] + beta C, each a pointer with
/// its row and column strides), its m rows split into `parts` blocks run on rayon's pool.
/// The blocks write disjoint rows of C and read A and B only; each element's sum over k
/// is the unsplit call's.
///
/// # Safety
/// The strides must keep every element of A, B and C inside its allocation, and C must
/// not overlap A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_rows(
    parts: usize, m: usize, k: usize, n: usize, alpha: f32, a: (*const f32, isize, isize),
    b: (*const f32, isize, isize), beta: f32, c: (*mut f32, isize, isize),
) {
    // Addresses, not pointers, so the closure may run on rayon's threads (raw pointers are
    // not Send): A and B are only read, and the blocks write disjoint rows of C.
    let (pa, pb, pc) = (a.0 as usize, b.0 as usize, c.0 as usize);
    let block = |r0: usize, r1: usize| {
        // SAFETY: rows r0..r1 of A and C lie inside the matrices the caller vouches for
        // (r0 < m; with k = 0 A is not read)
        unsafe {
            matrixmultiply::sgemm(
                r1 - r0,
                k,
                n,
                alpha,
                (pa as *const f32).offset(r0 as isize * a.1),
                a.1,
                a.2,
                pb as *const f32,
                b.1,
                b.2,
                beta,
                (pc as *mut f32).offset(r0 as isize * c.1),
                c.1,
                c.2,
            )
        }
    };
    if parts <= 1 {
        return block(0, m);
    }
    // Block edges at multiples of SPLIT_ALIGN rows: matrixmultiply's register tiles then
    // fall where they fall in the whole call, so no tile becomes a partial (masked) one
    // whose beta C term rounds differently; the last block keeps the whole call's tail.
    let edge = |p: usize| {
        if p == parts {
            m
        } else {
            m * p / parts / SPLIT_ALIGN * SPLIT_ALIGN
        }
    };
    (0..parts).into_par_iter().for_each(|p| {
        let (r0, r1) = (edge(p), edge(p + 1));
        if r1 > r0 {
            block(r0, r1);
        }
    });
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
/// views: [`gemm_view_ldc`] with row stride n.
#[allow(clippy::too_many_arguments)]
pub fn gemm_view(c: &mut [f32], a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    gemm_view_ldc(c, n, a, b, m, n, k, alpha, beta)
}

/// c[m,n] (row-major, row i at c[i ldc..]) = alpha * a[m,k] b[k,n] + beta * c, with a and
/// b any strided views, so a product can land in one head's columns of a packed [n, h d]
/// tensor. Same kernels (and so the same results, whatever ldc) as [`gemm`], on the
/// calling thread only with the `gemm` crate: its callers (attention's per-sequence
/// products) already run one task per rayon thread (matrixmultiply does not thread
/// products this small).
#[allow(clippy::too_many_arguments)]
pub fn gemm_view_ldc(c: &mut [f32], ldc: usize, a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "gemm_view: row stride {ldc} below the {n} columns");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_view: c too small");
    a.check(m, k, "a");
    b.check(k, n, "b");
    if kernel() == Kernel::GemmCrate {
        return strided(c, ldc, a, b, m, n, k, alpha, beta, Parallelism::None);
    }
    // With k = 0 nothing is read (c = beta c) and the offsets may point past the end.
    let (oa, ob) = if k == 0 { (0, 0) } else { (a.offset, b.offset) };
    // SAFETY: `check` bounds every element the strides reach inside each slice; c holds
    // (m - 1) ldc + n elements (asserted).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr().add(oa),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr().add(ob),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of the thread tests: both orientations (m >= n and n > m), k of 0, 1, 2
    /// (the `gemm` crate's outer-product path) and odd, one-row and one-column outputs (its
    /// GEMV paths), sizes past its cache blocks (k > 512) and both libraries' threading
    /// thresholds, row counts that 2, 3 and 7 parts do and do not divide.
    const THREAD_CASES: [(usize, usize, usize); 9] = [
        (197, 130, 37),
        (130, 197, 37),
        (300, 64, 1),
        (64, 300, 2),
        (64, 300, 0),
        (1, 300, 70),
        (300, 1, 70),
        (129, 129, 65),
        (700, 450, 1100),
    ];

    /// `product(c, a, b, m, n, k, ta, tb, beta, threads)` (alpha 1.25) with 2, 3 and 7
    /// threads must give the bits of 1 thread, for every [`THREAD_CASES`] shape, every
    /// transpose and beta 0 (c filled with NaN, which beta 0 must not read) and 0.75.
    fn assert_threads_keep_bits(
        product: impl Fn(&mut [f32], &[f32], &[f32], usize, usize, usize, bool, bool, f32, usize),
    ) {
        let mut x = crate::util::Lcg::new(5);
        let mut vals = |len: usize| -> Vec<f32> { (0..len).map(|_| x.next_unit() - 0.5).collect() };
        for (m, n, k) in THREAD_CASES {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for beta in [0.0, 0.75] {
                    let (a, b) = (vals(m * k), vals(k * n));
                    let c0 = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        vals(m * n)
                    };
                    let mut one = c0.clone();
                    product(&mut one, &a, &b, m, n, k, ta, tb, beta, 1);
                    assert!(one.iter().all(|v| v.is_finite()), "m {m} n {n} k {k}: not finite");
                    for threads in [2, 3, 7] {
                        let mut many = c0.clone();
                        product(&mut many, &a, &b, m, n, k, ta, tb, beta, threads);
                        let same = one.iter().zip(&many).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(
                            same,
                            "m {m} n {n} k {k} ta {ta} tb {tb} beta {beta}: {threads} threads differ"
                        );
                    }
                }
            }
        }
    }

    /// The `gemm` crate's threads must not change a bit (the calling thread alone against
    /// pools of 2, 3 and 7).
    #[test]
    fn gemm_crate_gives_the_same_bits_for_any_thread_count() {
        let pools: Vec<rayon::ThreadPool> = (0..=7)
            .map(|t| rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build().unwrap())
            .collect();
        assert_threads_keep_bits(|c, a, b, m, n, k, ta, tb, beta, threads| {
            if threads == 1 {
                gemm_with(c, a, b, m, n, k, ta, tb, 1.25, beta, Parallelism::None)
            } else {
                pools[threads].install(|| gemm_with(c, a, b, m, n, k, ta, tb, 1.25, beta, Parallelism::Rayon(0)))
            }
        });
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
            // ... and into columns 3..3+n of rows ldc = n + 10 apart (one head of a packed
            // tensor): the same bits there, nothing written elsewhere
            let ldc = n + 10;
            let mut wide = vec![f32::NAN; 3 + (m - 1) * ldc + n + 4];
            for i in 0..m {
                wide[3 + i * ldc..][..n].copy_from_slice(&c0[i * n..(i + 1) * n]);
            }
            let before = wide.clone();
            gemm_view_ldc(&mut wide[3..], ldc, va, vb, m, n, k, 1.5, -0.5);
            for (e, (got, old)) in wide.iter().zip(&before).enumerate() {
                let (i, j) = (
                    (e as isize - 3).div_euclid(ldc as isize),
                    (e as isize - 3).rem_euclid(ldc as isize),
                );
                if e >= 3 && (i as usize) < m && (j as usize) < n {
                    let want = c[i as usize * n + j as usize];
                    assert_eq!(got.to_bits(), want.to_bits(), "ta {ta} tb {tb}: ldc product ({i},{j})");
                } else {
                    assert!(
                        got.is_nan() && old.is_nan(),
                        "ta {ta} tb {tb}: element {e} outside c written"
                    );
                }
            }
        }
    }

    /// Splitting matrixmultiply's GEMM rows over threads (more than 4 threads) into 2, 3
    /// and 7 parts must not change a bit.
    #[test]
    fn split_gemms_give_the_unsplit_bits() {
        assert_threads_keep_bits(|c, a, b, m, n, k, ta, tb, beta, parts| {
            gemm_in_parts(c, a, b, m, n, k, ta, tb, 1.25, beta, parts)
        });
    }
}
