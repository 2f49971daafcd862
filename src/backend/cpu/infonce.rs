//! Class-masked InfoNCE of DeepCUT (SPEC section 4), forward and backward.
//! CPU twin of kernels/infonce.cu.
//!
//! For a valid anchor i (anchor flag set, |P_i| > 0, |D_i| > 0), with s_ij = z_i.z_j / tau:
//! ```text
//! L_i = -mean_{p in P_i} s_ip + logsumexp_{n in D_i} s_in
//! P_i = { j : y_j != y_i }        D_i = { j != i : y_j = y_i } (same-class) | { j != i } (all)
//!                                 minus partner(i) with own-view = exclude
//! ```
//! How it is computed, and never with the m x m matrix in memory:
//! - The linear term reduces to per-class sums: mean_{p in P_i} z_p = (S - S_{y_i}) /
//!   (m - n_{y_i}) with S the sum of all rows and S_k of class k, so O(m c) in f64.
//! - Only the logsumexp needs pairs. Rows are grouped (same-class: one group per class,
//!   columns = that class's rows; all: one group, columns = every row), so the masks left
//!   inside a group are the diagonal and the partner, at most two entries per anchor row.
//!   Per group, tiles of ANCHOR_TILE anchors x COL_TILE columns: S = Za Zc^T / tau by one
//!   GEMM, then an online logsumexp per row (running max and sum). lse is saved.
//! - Backward recomputes the tiles, P = exp(S - lse) (masked entries 0), in two passes:
//!   pass 1 over anchor tiles gives the anchor rows' gradient, dZa = (P Zc - mu_{y_i}) / tau;
//!   pass 2 (only when the columns are not detached) over column tiles gives
//!   dZc = P^T Za / tau plus the column side of the linear term, again per-class sums.
//!   Every output row is written by exactly one task that visits tiles in a fixed order:
//!   no atomics, and bit-identical results for any number of threads.
//!
//! Precision (`inputs`): in bf16 / fp16 the similarities are products of z rounded to 16
//! bits (the tensor-core dot products of kernels/infonce.cu), accumulated in fp32: the
//! score tiles and the forward's linear term read the rounded rows. The anchor gradient
//! (pass 1) is a product of 16-bit inputs too, as the GPU's tensor cores compute it: p
//! rounded to 16 bits times the rounded column rows, fp32 accumulation, minus the linear
//! term's class mean of the rounded rows (f64). lse, losses and the column-side gradient
//! (pass 2, only with `detach_columns` false) stay fp32 on z as given.
//!
//! The CUDA kernel (Inf-CL style) has the same shape: the host sorts rows by class once
//! (groups become contiguous ranges), one thread block per anchor tile for the forward
//! and for backward pass 1, one per column tile for pass 2, each streaming the other
//! side's tiles through shared memory with the similarity tile in registers; lse and the
//! per-class sums in fp32/f64 as here.
use super::gemm::gemm;
use super::quantize::{round_in_place, rounded_copy};
use super::simd::{self, multiversion};
use crate::backend::{Denominator, InfoNceOptions, OwnView, Precision};
use rayon::prelude::*;

/// Anchor rows per tile (one task, one future thread block).
pub const ANCHOR_TILE: usize = 128;
/// Columns per tile. With ANCHOR_TILE, bounds the scratch memory of a task
/// (ANCHOR_TILE x COL_TILE floats).
pub const COL_TILE: usize = 128;

/// Marks "no position" in `Group::masked`.
const NONE: usize = usize::MAX;

/// One block of the pair loop: the valid anchors of a group against its columns.
struct Group {
    /// Row indices of the valid anchors, in row order.
    anchors: Vec<usize>,
    /// Row indices of the columns, in row order.
    cols: Vec<usize>,
    /// Per anchor: positions in `cols` of itself and of its excluded partner (or NONE).
    masked: Vec<[usize; 2]>,
    /// Za [anchors, c] and Zc [cols, c], gathered once so tiles are contiguous.
    za: Vec<f32>,
    zc: Vec<f32>,
    /// The same rows rounded to 16 bits for the similarities (None in fp32: za, zc).
    sa: Option<Vec<f32>>,
    sc: Option<Vec<f32>>,
}

impl Group {
    /// The rows the similarities read: rounded in bf16 / fp16.
    fn sim_a(&self) -> &[f32] {
        self.sa.as_deref().unwrap_or(&self.za)
    }
    fn sim_c(&self) -> &[f32] {
        self.sc.as_deref().unwrap_or(&self.zc)
    }
}

/// Host-side bookkeeping shared by forward and backward, O(m c).
struct Plan {
    /// Dense class id per row, and rows per class.
    class: Vec<usize>,
    count: Vec<usize>,
    valid: Vec<bool>,
    groups: Vec<Group>,
}

impl Plan {
    /// `zs`: z rounded for the similarities (`rounded_copy`; None in fp32).
    #[allow(clippy::too_many_arguments)]
    fn new(
        z: &[f32], zs: Option<&[f32]>, labels: &[i32], anchor: &[i32], partner: &[i32], m: usize, c: usize,
        opts: &InfoNceOptions,
    ) -> Plan {
        let valid = opts.valid_anchors(labels, anchor, partner, m);
        let mut ids: Vec<i32> = labels[..m].to_vec();
        ids.sort_unstable();
        ids.dedup();
        let class: Vec<usize> = labels[..m]
            .iter()
            .map(|y| ids.binary_search(y).expect("label present"))
            .collect();
        let mut count = vec![0usize; ids.len()];
        for &k in &class {
            count[k] += 1;
        }
        // Column lists per group, and each row's position in its group's columns.
        let mut cols: Vec<Vec<usize>> = match opts.denominator {
            Denominator::SameClass => vec![Vec::new(); ids.len()],
            Denominator::All => vec![Vec::new()],
        };
        let group_of = |i: usize| match opts.denominator {
            Denominator::SameClass => class[i],
            Denominator::All => 0,
        };
        let mut pos = vec![0usize; m];
        for i in 0..m {
            let g = &mut cols[group_of(i)];
            pos[i] = g.len();
            g.push(i);
        }
        let mut anchors: Vec<Vec<usize>> = vec![Vec::new(); cols.len()];
        for i in (0..m).filter(|&i| valid[i]) {
            anchors[group_of(i)].push(i);
        }
        let gather = |z: &[f32], rows: &[usize]| {
            let mut out = Vec::with_capacity(rows.len() * c);
            for &r in rows {
                out.extend_from_slice(&z[r * c..(r + 1) * c]);
            }
            out
        };
        let groups = cols
            .into_iter()
            .zip(anchors)
            .filter(|(_, a)| !a.is_empty())
            .map(|(cols, anchors)| {
                let masked = anchors
                    .iter()
                    .map(|&i| {
                        let p = partner[i];
                        let excluded = opts.own_view == OwnView::Exclude
                            && p >= 0
                            && p as usize != i
                            && group_of(p as usize) == group_of(i);
                        [pos[i], if excluded { pos[p as usize] } else { NONE }]
                    })
                    .collect();
                Group {
                    za: gather(z, &anchors),
                    zc: gather(z, &cols),
                    sa: zs.map(|zs| gather(zs, &anchors)),
                    sc: zs.map(|zs| gather(zs, &cols)),
                    anchors,
                    cols,
                    masked,
                }
            })
            .collect();
        Plan {
            class,
            count,
            valid,
            groups,
        }
    }

    /// (group, first, last) work items: tiles of `size` over each group's anchors, or
    /// over its columns.
    fn tiles(&self, size: usize, of_cols: bool) -> Vec<(usize, usize, usize)> {
        let mut items = Vec::new();
        for (g, grp) in self.groups.iter().enumerate() {
            let n = if of_cols { grp.cols.len() } else { grp.anchors.len() };
            for t0 in (0..n).step_by(size) {
                items.push((g, t0, (t0 + size).min(n)));
            }
        }
        items
    }

    /// mu_k = mean of the rows not of class k, [K, c] in f64 (zero where no such row):
    /// the mean over P_i of z_p is mu_{y_i}. Rows summed in order, so deterministic.
    fn other_class_means(&self, z: &[f32], m: usize, c: usize) -> Vec<f64> {
        let k = self.count.len();
        let mut sum_k = vec![0f64; k * c];
        for i in 0..m {
            let s = &mut sum_k[self.class[i] * c..(self.class[i] + 1) * c];
            for (a, &x) in s.iter_mut().zip(&z[i * c..(i + 1) * c]) {
                *a += x as f64;
            }
        }
        let mut total = vec![0f64; c];
        for s in sum_k.chunks(c) {
            for (t, x) in total.iter_mut().zip(s) {
                *t += x;
            }
        }
        let mut mu = vec![0f64; k * c];
        for cl in 0..k {
            let others = m - self.count[cl];
            if others == 0 {
                continue;
            }
            let s = &sum_k[cl * c..(cl + 1) * c];
            for ((u, t), x) in mu[cl * c..(cl + 1) * c].iter_mut().zip(&total).zip(s) {
                *u = (t - x) / others as f64;
            }
        }
        mu
    }
}

/// s[ta, tc] = za[a0..a1] zc[c0..c1]^T / tau with each anchor's excluded columns (itself,
/// its partner) at -inf.
#[allow(clippy::too_many_arguments)]
fn score_tile(s: &mut [f32], g: &Group, a0: usize, a1: usize, c0: usize, c1: usize, c: usize, inv_tau: f32) {
    let (ta, tc) = (a1 - a0, c1 - c0);
    gemm(
        s,
        &g.sim_a()[a0 * c..],
        &g.sim_c()[c0 * c..],
        ta,
        tc,
        c,
        false,
        true,
        inv_tau,
        0.0,
    );
    for r in 0..ta {
        for &p in &g.masked[a0 + r] {
            if (c0..c1).contains(&p) {
                s[r * tc + p - c0] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Same tile transposed, st[tc, ta] (for the column pass).
#[allow(clippy::too_many_arguments)]
fn score_tile_t(st: &mut [f32], g: &Group, a0: usize, a1: usize, c0: usize, c1: usize, c: usize, inv_tau: f32) {
    let (ta, tc) = (a1 - a0, c1 - c0);
    gemm(
        st,
        &g.sim_c()[c0 * c..],
        &g.sim_a()[a0 * c..],
        tc,
        ta,
        c,
        false,
        true,
        inv_tau,
        0.0,
    );
    for r in 0..ta {
        for &p in &g.masked[a0 + r] {
            if (c0..c1).contains(&p) {
                st[(p - c0) * ta + r] = f32::NEG_INFINITY;
            }
        }
    }
}

multiversion! {
    /// Online logsumexp over one tile s [ta, tc]: per row r, with the tile's max t_r,
    /// mx_r' = max(mx_r, t_r) and sum_r' = sum_r e^(mx_r - mx_r') + sum_j e^(s_rj - mx_r').
    /// Rows whose columns are all excluded (-inf) are left as they are.
    fn online_lse_tile(s: &[f32], tc: usize, mx: &mut [f32], sum: &mut [f32]) {
        let mut e = [0f32; COL_TILE];
        for (r, row) in s.chunks(tc).enumerate() {
            let tmax = simd::max(row);
            if tmax == f32::NEG_INFINITY {
                continue; // every column of this tile is excluded for this anchor
            }
            let new_mx = mx[r].max(tmax);
            for (e, &x) in e.iter_mut().zip(row) {
                *e = simd::exp(x - new_mx);
            }
            sum[r] = sum[r] * simd::exp(mx[r] - new_mx) + simd::sum(&e[..tc]);
            mx[r] = new_mx;
        }
    }
}

multiversion! {
    /// s [rows, tc]: s_rj = e^(s_rj - l_r) (probabilities from the saved logsumexp).
    fn exp_minus_row(s: &mut [f32], tc: usize, l: &[f32]) {
        for (row, &l) in s.chunks_mut(tc).zip(l) {
            for x in row.iter_mut() {
                *x = simd::exp(*x - l);
            }
        }
    }
}

multiversion! {
    /// st [rows, ta] (transposed tile): st_rj = e^(st_rj - l_j).
    fn exp_minus_col(st: &mut [f32], ta: usize, l: &[f32]) {
        for row in st.chunks_mut(ta) {
            for (x, &l) in row.iter_mut().zip(l) {
                *x = simd::exp(*x - l);
            }
        }
    }
}

#[inline]
fn dot64(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, y)| x as f64 * y).sum()
}

/// loss[i] = L_i and lse[i] = logsumexp_{n in D_i} s_in on valid anchors, 0 elsewhere.
/// z [m, c] (unit rows), labels, anchor, partner [m].
#[allow(clippy::too_many_arguments)]
pub fn infonce_fwd(
    loss: &mut [f32], lse: &mut [f32], z: &[f32], labels: &[i32], anchor: &[i32], partner: &[i32], m: usize, c: usize,
    opts: InfoNceOptions, inputs: Precision,
) {
    loss[..m].fill(0.0);
    lse[..m].fill(0.0);
    let zs = rounded_copy(&z[..m * c], inputs);
    let plan = Plan::new(z, zs.as_deref(), labels, anchor, partner, m, c, &opts);
    let inv_tau = 1.0 / opts.tau;
    let items = plan.tiles(ANCHOR_TILE, false);
    let results: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(g, a0, a1)| {
            let grp = &plan.groups[g];
            let (ta, nc) = (a1 - a0, grp.cols.len());
            let mut mx = vec![f32::NEG_INFINITY; ta];
            let mut sum = vec![0f32; ta];
            let mut s = vec![0f32; ta * COL_TILE];
            for c0 in (0..nc).step_by(COL_TILE) {
                let c1 = (c0 + COL_TILE).min(nc);
                let tc = c1 - c0;
                score_tile(&mut s, grp, a0, a1, c0, c1, c, inv_tau);
                online_lse_tile(&s[..ta * tc], tc, &mut mx, &mut sum);
            }
            // valid anchors have |D_i| > 0, so the max term contributes exp(0) = 1 and sum >= 1
            mx.iter().zip(&sum).map(|(&a, &b)| a + b.ln()).collect()
        })
        .collect();
    // the linear term is a sum of similarities: over the rows they read
    let zs = zs.as_deref().unwrap_or(z);
    let mu = plan.other_class_means(zs, m, c);
    for (&(g, a0, _), l) in items.iter().zip(results) {
        for (r, l) in l.into_iter().enumerate() {
            let i = plan.groups[g].anchors[a0 + r];
            let k = plan.class[i];
            let lin = dot64(&zs[i * c..(i + 1) * c], &mu[k * c..(k + 1) * c]) * inv_tau as f64;
            lse[i] = l;
            loss[i] = (l as f64 - lin) as f32;
        }
    }
}

/// dz [m, c] (overwritten) = scale * d(sum of L_i over valid anchors)/dz, from the lse
/// that `infonce_fwd` saved. Column-side terms only when `opts.detach_columns` is false.
#[allow(clippy::too_many_arguments)]
pub fn infonce_bwd(
    dz: &mut [f32], z: &[f32], lse: &[f32], labels: &[i32], anchor: &[i32], partner: &[i32], m: usize, c: usize,
    opts: InfoNceOptions, scale: f32, inputs: Precision,
) {
    dz[..m * c].fill(0.0);
    let zs = rounded_copy(&z[..m * c], inputs);
    let plan = Plan::new(z, zs.as_deref(), labels, anchor, partner, m, c, &opts);
    let inv_tau = 1.0 / opts.tau;
    let k = plan.count.len();

    // Pass 1, anchor rows: dz_i = (sum_{j in D_i} p_ij z_j - mu_{y_i}) / tau.
    let items = plan.tiles(ANCHOR_TILE, false);
    let rows: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(g, a0, a1)| {
            let grp = &plan.groups[g];
            let (ta, nc) = (a1 - a0, grp.cols.len());
            let l: Vec<f32> = grp.anchors[a0..a1].iter().map(|&i| lse[i]).collect();
            let mut s = vec![0f32; ta * COL_TILE];
            let mut dza = vec![0f32; ta * c];
            for c0 in (0..nc).step_by(COL_TILE) {
                let c1 = (c0 + COL_TILE).min(nc);
                let tc = c1 - c0;
                score_tile(&mut s, grp, a0, a1, c0, c1, c, inv_tau);
                exp_minus_row(&mut s[..ta * tc], tc, &l);
                round_in_place(&mut s[..ta * tc], inputs); // 16-bit: p and z both GEMM inputs
                gemm(&mut dza, &s, &grp.sim_c()[c0 * c..], ta, c, tc, false, false, 1.0, 1.0);
            }
            dza
        })
        .collect();
    // the linear term's mean over the rows the products read
    let mu = plan.other_class_means(zs.as_deref().unwrap_or(z), m, c);
    for (&(g, a0, _), dza) in items.iter().zip(rows) {
        for (r, d) in dza.chunks(c).enumerate() {
            let i = plan.groups[g].anchors[a0 + r];
            let u = &mu[plan.class[i] * c..(plan.class[i] + 1) * c];
            for ((o, &d), &u) in dz[i * c..(i + 1) * c].iter_mut().zip(d).zip(u) {
                *o = scale * ((d as f64 - u) * inv_tau as f64) as f32;
            }
        }
    }
    if opts.detach_columns {
        return;
    }

    // Pass 2, columns, lse part: dz_j += sum_{i : j in D_i} p_ij z_i / tau.
    let items = plan.tiles(COL_TILE, true);
    let cols: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(g, c0, c1)| {
            let grp = &plan.groups[g];
            let (tc, na) = (c1 - c0, grp.anchors.len());
            let mut st = vec![0f32; tc * ANCHOR_TILE];
            let mut dzc = vec![0f32; tc * c];
            let la: Vec<f32> = grp.anchors.iter().map(|&i| lse[i]).collect();
            for a0 in (0..na).step_by(ANCHOR_TILE) {
                let a1 = (a0 + ANCHOR_TILE).min(na);
                let ta = a1 - a0;
                score_tile_t(&mut st, grp, a0, a1, c0, c1, c, inv_tau);
                exp_minus_col(&mut st[..tc * ta], ta, &la[a0..a1]);
                gemm(&mut dzc, &st, &grp.za[a0 * c..], tc, c, ta, false, false, 1.0, 1.0);
            }
            dzc
        })
        .collect();
    for (&(g, c0, _), dzc) in items.iter().zip(cols) {
        for (r, d) in dzc.chunks(c).enumerate() {
            let j = plan.groups[g].cols[c0 + r];
            for (o, &d) in dz[j * c..(j + 1) * c].iter_mut().zip(d) {
                *o += scale * d * inv_tau;
            }
        }
    }

    // Columns, linear part: row j is in P_i of every valid anchor i of another class, and
    // receives -z_i / (|P_i| tau) from each. With A_k the sum of the valid anchors of
    // class k and w_k = 1 / (m - n_k): dz_j -= (sum_k w_k A_k - w_{y_j} A_{y_j}) / tau.
    let mut wa = vec![0f64; k * c];
    for i in (0..m).filter(|&i| plan.valid[i]) {
        let cl = plan.class[i];
        let w = 1.0 / (m - plan.count[cl]) as f64;
        for (a, &x) in wa[cl * c..(cl + 1) * c].iter_mut().zip(&z[i * c..(i + 1) * c]) {
            *a += w * x as f64;
        }
    }
    let mut total = vec![0f64; c];
    for a in wa.chunks(c) {
        for (t, x) in total.iter_mut().zip(a) {
            *t += x;
        }
    }
    for j in 0..m {
        let own = &wa[plan.class[j] * c..(plan.class[j] + 1) * c];
        for ((o, t), a) in dz[j * c..(j + 1) * c].iter_mut().zip(&total).zip(own) {
            *o -= scale * ((t - a) * inv_tau as f64) as f32;
        }
    }
}

/// Synthetic InfoNCE rows of DeepCUT's shape at B_f 8, B_r 32, for the CPU and GPU
/// benches (the values do not change the cost): `m` unit rows of width `c`, a third of
/// them forget tokens (views a and b, partners of each other, all anchors), 13 classes
/// with 'O' (0) on ~80% of rows. Returns (z, labels, anchor, partner); the anchors
/// number 2 * (m / 6).
pub fn synthetic_rows(m: usize, c: usize) -> (Vec<f32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut rng = crate::util::Lcg::new(0x9E37_79B9_7F4A_7C15);
    let mut next = move || rng.next_u31();
    let nf = m / 6;
    let mut labels = vec![0i32; m];
    let (mut anchor, mut partner) = (vec![0i32; m], vec![-1i32; m]);
    for y in labels.iter_mut() {
        *y = if next() % 5 == 0 { 1 + (next() % 12) as i32 } else { 0 };
    }
    for i in 0..nf {
        labels[nf + i] = labels[i];
        (anchor[i], anchor[nf + i]) = (1, 1);
        (partner[i], partner[nf + i]) = ((nf + i) as i32, i as i32);
    }
    let mut z: Vec<f32> = (0..m * c).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
    for row in z.chunks_mut(c) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
    (z, labels, anchor, partner)
}
