//! Two-component PCA for the report's embedding picture (forget tokens before and after
//! unlearning). Power iteration with deflation on the c x c covariance (one f64 GEMM of
//! the `gemm` crate, the CPU backend's): deterministic (fixed start vector, fixed iteration
//! count).

/// Principal axes (2 x c, unit length) of the rows of x [m, c], and the mean.
pub fn pca2_axes(x: &[f32], m: usize, c: usize) -> (Vec<f64>, [Vec<f64>; 2]) {
    let mut mean = vec![0f64; c];
    for row in x.chunks(c).take(m) {
        for (a, &v) in mean.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    mean.iter_mut().for_each(|a| *a /= m.max(1) as f64);
    let cov = covariance(x, m, c, &mean);
    let first = power_iteration(&cov, c, None);
    let second = power_iteration(&cov, c, Some(&first));
    (mean, [first, second])
}

/// Sum over the rows of x [m, c] of (row - mean)(row - mean)^T, [c, c] row-major.
fn covariance(x: &[f32], m: usize, c: usize, mean: &[f64]) -> Vec<f64> {
    // cov = D^T D over the centred rows D [m, c]: one f64 GEMM (the row-by-row outer
    // products took ~0.2 s for 5,000 tokens at c = 384)
    let d: Vec<f64> = x
        .chunks(c)
        .take(m)
        .flat_map(|row| row.iter().zip(mean).map(|(&v, mu)| v as f64 - mu))
        .collect();
    let rows = d.len() / c.max(1);
    let mut cov = vec![0f64; c * c];
    // SAFETY: lhs = D^T is [c, rows] (column stride c, row stride 1) and rhs = D is
    // [rows, c] (column stride 1, row stride c), both within d (rows * c); dst is [c, c]
    // row-major within cov. The crate's threads split the output, never a sum: the same
    // bits on any thread count.
    unsafe {
        gemm_crate::gemm(
            c,
            c,
            rows,
            cov.as_mut_ptr(),
            1,
            c as isize,
            false,
            d.as_ptr(),
            c as isize,
            1,
            d.as_ptr(),
            1,
            c as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_crate::Parallelism::Rayon(0),
        );
    }
    cov
}

fn power_iteration(cov: &[f64], c: usize, orth: Option<&[f64]>) -> Vec<f64> {
    let mut v: Vec<f64> = (0..c).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
    for _ in 0..200 {
        if let Some(o) = orth {
            let p: f64 = v.iter().zip(o).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(o).for_each(|(a, b)| *a -= p * b);
        }
        let mut w = vec![0f64; c];
        for i in 0..c {
            w[i] = cov[i * c..(i + 1) * c].iter().zip(&v).map(|(a, b)| a * b).sum();
        }
        let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm < 1e-300 {
            break;
        }
        v = w.into_iter().map(|a| a / norm).collect();
    }
    v
}

/// Projects the rows of x [m, c] on the axes.
pub fn project(x: &[f32], m: usize, c: usize, mean: &[f64], axes: &[Vec<f64>; 2]) -> Vec<(f64, f64)> {
    x.chunks(c)
        .take(m)
        .map(|row| {
            let d: Vec<f64> = row.iter().zip(mean).map(|(&v, mu)| v as f64 - mu).collect();
            let p = |a: &Vec<f64>| d.iter().zip(a).map(|(x, y)| x * y).sum::<f64>();
            (p(&axes[0]), p(&axes[1]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariance_is_the_sum_of_outer_products() {
        let (m, c) = (37, 11);
        let x: Vec<f32> = (0..m * c).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.03).collect();
        let mean: Vec<f64> = (0..c).map(|j| (j as f64 - 5.0) * 0.1).collect();
        let cov = covariance(&x, m, c, &mean);
        for i in 0..c {
            for j in 0..c {
                let want: f64 = (0..m)
                    .map(|r| (x[r * c + i] as f64 - mean[i]) * (x[r * c + j] as f64 - mean[j]))
                    .sum();
                assert!(
                    (cov[i * c + j] - want).abs() < 1e-9 * want.abs().max(1.0),
                    "cov[{i},{j}]"
                );
            }
        }
        assert!(covariance(&x, 0, c, &mean).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn finds_the_dominant_directions() {
        // points spread along (1,1,0) strongly and (1,-1,0) weakly
        let mut x = vec![];
        for i in 0..50 {
            let a = (i as f32 - 25.0) * 0.3;
            let b = ((i * 7 % 11) as f32 - 5.0) * 0.1;
            x.extend_from_slice(&[a + b, a - b, 0.01 * (i % 3) as f32]);
        }
        let (_, axes) = pca2_axes(&x, 50, 3);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((axes[0][0].abs() - s).abs() < 1e-3 && (axes[0][1].abs() - s).abs() < 1e-3);
        assert!(axes[0][0] * axes[0][1] > 0.0);
        assert!(axes[1][0] * axes[1][1] < 0.0, "second axis is (1,-1,0): {:?}", axes[1]);
        let dot: f64 = axes[0].iter().zip(&axes[1]).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-6);
    }
}
