//! GEMM and bias ops (CPU twin of the cuBLASLt wrapper).
use rayon::prelude::*;

/// c[m,n] = alpha * op(a) op(b) + beta * c (row-major; `ta`/`tb` mean a is stored [k,m],
/// b is stored [n,k]). matrixmultiply takes arbitrary strides, so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32,
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
            matrixmultiply::sgemm(
                n,
                k,
                m,
                alpha,
                b.as_ptr(),
                csb,
                rsb,
                a.as_ptr(),
                csa,
                rsa,
                beta,
                c.as_mut_ptr(),
                1,
                n as isize,
            );
        } else {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
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
/// views. Same kernel (and so the same results) as [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_view(c: &mut [f32], a: View, b: View, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    assert!(c.len() >= m * n, "gemm_view: c too small");
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k, "a");
    b.check(k, n, "b");
    // With k = 0 nothing is read (c = beta c) and the offsets may point past the end.
    let (oa, ob) = if k == 0 { (0, 0) } else { (a.offset, b.offset) };
    // SAFETY: `check` bounds every element the strides reach inside each slice; c holds
    // m*n elements (asserted).
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
            n as isize,
            1,
        );
    }
}
