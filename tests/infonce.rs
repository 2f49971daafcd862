//! The DeepCUT contrastive path: gather_rows / scatter_add_rows, l2norm and the
//! class-masked InfoNCE (SPEC section 4).
//!
//! The InfoNCE reference is a naive per-anchor implementation in f64 written from the
//! SPEC's definitions (P_i and D_i built explicitly as index lists), with its gradient
//! by a plain formula; that formula is itself checked against central differences of the
//! naive loss. The CPU op must match it for every option combination on awkward sizes
//! (partial tiles, several tiles) and on the edge cases the SPEC's "valid anchor" rule
//! exists for. Tolerances: forward 1e-5 relative, gradients 1e-4 relative L2.
mod common;
use common::{rel_l2, Rng};
use deepcut_fast::backend::cpu::infonce::{self, ANCHOR_TILE, COL_TILE};
use deepcut_fast::backend::cpu::{l2norm, rows, Cpu};
use deepcut_fast::backend::{infonce_loss_host, Backend, Denominator, InfoNceOptions, OwnView, Precision};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
/// The sizes of `infonce_matches_naive_all_options` (130, 300 rows) must span several tiles.
const _SPANS_TILES: () = assert!(ANCHOR_TILE < 130 && COL_TILE < 130);

/// One batch of contrastive rows.
#[derive(Clone, Debug)]
struct Case {
    m: usize,
    c: usize,
    z: Vec<f32>,
    labels: Vec<i32>,
    anchor: Vec<i32>,
    partner: Vec<i32>,
}

fn unit_rows(rng: &mut Rng, m: usize, c: usize) -> Vec<f32> {
    let mut z = rng.vec(m * c, 1.0);
    for row in z.chunks_mut(c) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    z
}

/// A DeepCUT-like batch: forget pairs (views a and b, partners of each other, same label,
/// mostly anchors), retain rows (partner -1, mostly not anchors, a few anchors without a
/// partner), a dominant class like 'O', a class with a single member, a class whose only
/// members are one forget pair (empty D_i under same-class + exclude), label ids that are
/// not 0..K; rows shuffled so groups and tiles interleave.
fn make_case(rng: &mut Rng, m: usize, c: usize) -> Case {
    let nf = m * 3 / 10;
    let mut labels = vec![0i32; m];
    let mut anchor = vec![0i32; m];
    let mut partner = vec![-1i32; m];
    let draw = |rng: &mut Rng| [0, 0, 0, 1, 2, 12, -3][rng.below(7)];
    for i in 0..nf {
        let y = draw(rng);
        labels[i] = y;
        labels[i + nf] = y;
        partner[i] = (i + nf) as i32;
        partner[i + nf] = i as i32;
        anchor[i] = (rng.below(5) != 0) as i32;
        anchor[i + nf] = (rng.below(5) != 0) as i32;
    }
    for i in 2 * nf..m {
        labels[i] = draw(rng);
        anchor[i] = (rng.below(6) == 0) as i32;
    }
    if nf >= 2 {
        // the only members of class 55: one forget pair, both anchors
        labels[0] = 55;
        labels[nf] = 55;
        anchor[0] = 1;
        anchor[nf] = 1;
    }
    if m > 2 * nf {
        // a class with a single member, an anchor without partner
        labels[m - 1] = 77;
        anchor[m - 1] = 1;
    }
    // shuffle rows (Fisher-Yates), remapping partner indices
    let mut perm: Vec<usize> = (0..m).collect();
    for i in (1..m).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let mut inv = vec![0usize; m];
    for (new, &old) in perm.iter().enumerate() {
        inv[old] = new;
    }
    Case {
        m,
        c,
        z: unit_rows(rng, m, c),
        labels: perm.iter().map(|&o| labels[o]).collect(),
        anchor: perm.iter().map(|&o| anchor[o]).collect(),
        partner: perm
            .iter()
            .map(|&o| {
                if partner[o] < 0 {
                    -1
                } else {
                    inv[partner[o] as usize] as i32
                }
            })
            .collect(),
    }
}

fn all_options(tau: f32) -> Vec<InfoNceOptions> {
    let mut v = Vec::new();
    for denominator in [Denominator::SameClass, Denominator::All] {
        for own_view in [OwnView::Negative, OwnView::Exclude] {
            for detach_columns in [true, false] {
                v.push(InfoNceOptions {
                    tau,
                    denominator,
                    own_view,
                    detach_columns,
                });
            }
        }
    }
    v
}

// ---- the naive reference, f64 -----------------------------------------------------

struct Naive {
    /// L_i on valid anchors, 0 elsewhere; lse likewise.
    per_row: Vec<f64>,
    lse: Vec<f64>,
    count: usize,
    /// Mean of L_i over valid anchors (0 when none).
    loss: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// P_i and D_i exactly as SPEC section 4 (and the brief) define them.
fn sets(k: &Case, i: usize, o: &InfoNceOptions) -> (Vec<usize>, Vec<usize>) {
    let p: Vec<usize> = (0..k.m).filter(|&j| k.labels[j] != k.labels[i]).collect();
    let d: Vec<usize> = (0..k.m)
        .filter(|&j| j != i)
        .filter(|&j| o.denominator == Denominator::All || k.labels[j] == k.labels[i])
        .filter(|&j| !(o.own_view == OwnView::Exclude && k.partner[i] == j as i32))
        .collect();
    (p, d)
}

/// Loss with the anchor role reading `za` and the column role reading `zc` (both [m, c]);
/// with za == zc it is the loss, with zc held fixed it is what detached columns see.
fn naive_loss(k: &Case, za: &[f64], zc: &[f64], o: &InfoNceOptions) -> Naive {
    let (m, c, tau) = (k.m, k.c, o.tau as f64);
    let (mut per_row, mut lse) = (vec![0.0; m], vec![0.0; m]);
    let mut count = 0;
    for i in 0..m {
        let (p, d) = sets(k, i, o);
        if k.anchor[i] == 0 || p.is_empty() || d.is_empty() {
            continue;
        }
        count += 1;
        let s = |j: usize| dot(&za[i * c..(i + 1) * c], &zc[j * c..(j + 1) * c]) / tau;
        let pos = p.iter().map(|&j| s(j)).sum::<f64>() / p.len() as f64;
        let mx = d.iter().map(|&j| s(j)).fold(f64::NEG_INFINITY, f64::max);
        let l = mx + d.iter().map(|&j| (s(j) - mx).exp()).sum::<f64>().ln();
        lse[i] = l;
        per_row[i] = -pos + l;
    }
    let loss = if count == 0 {
        0.0
    } else {
        per_row.iter().sum::<f64>() / count as f64
    };
    Naive {
        per_row,
        lse,
        count,
        loss,
    }
}

/// Gradient of scale * sum of valid L_i by the plain formula: the anchor side
/// dL_i/dz_i = (-mean_{p in P_i} z_p + sum_{n in D_i} w_in z_n) / tau, and (columns not
/// detached) dL_i/dz_p = -z_i / (|P_i| tau), dL_i/dz_n = w_in z_i / tau, w = softmax over D_i.
fn naive_grad(k: &Case, z: &[f64], o: &InfoNceOptions, scale: f64) -> Vec<f64> {
    let (m, c, tau) = (k.m, k.c, o.tau as f64);
    let mut g = vec![0.0; m * c];
    let nv = naive_loss(k, z, z, o);
    for i in 0..m {
        let (p, d) = sets(k, i, o);
        if k.anchor[i] == 0 || p.is_empty() || d.is_empty() {
            continue;
        }
        let zi: Vec<f64> = z[i * c..(i + 1) * c].to_vec();
        let mut add = |row: usize, coef: f64, src: &[f64]| {
            for t in 0..c {
                g[row * c + t] += scale * coef * src[t];
            }
        };
        for &j in &p {
            add(i, -1.0 / (p.len() as f64 * tau), &z[j * c..(j + 1) * c]);
            if !o.detach_columns {
                add(j, -1.0 / (p.len() as f64 * tau), &zi);
            }
        }
        for &j in &d {
            let w = (dot(&zi, &z[j * c..(j + 1) * c]) / tau - nv.lse[i]).exp();
            add(i, w / tau, &z[j * c..(j + 1) * c]);
            if !o.detach_columns {
                add(j, w / tau, &zi);
            }
        }
    }
    g
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Central differences in f64 of `f` w.r.t. every element of `x`.
fn numeric_grad64(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

// ---- the CPU op ----------------------------------------------------------------------

struct Out {
    per_row: Vec<f32>,
    lse: Vec<f32>,
    count: usize,
    loss: f32,
    /// Gradient of the mean loss (scale = 1 / count), or zeros when count is 0.
    dz: Vec<f32>,
}

fn run_cpu(k: &Case, o: &InfoNceOptions) -> Out {
    let be = Cpu;
    let (m, c) = (k.m, k.c);
    // buffers one row larger than needed: ops must respect the sizes they are given
    let (mut per_row, mut lse, mut dz) = (vec![9.0; m + 1], vec![9.0; m + 1], vec![9.0; (m + 1) * c]);
    let count = o
        .valid_anchors(&k.labels, &k.anchor, &k.partner, m)
        .iter()
        .filter(|&&v| v)
        .count();
    be.infonce_fwd(
        &mut per_row,
        &mut lse,
        &k.z,
        &k.labels,
        &k.anchor,
        &k.partner,
        m,
        c,
        *o,
        Precision::Fp32,
    );
    let scale = if count == 0 { 0.0 } else { 1.0 / count as f32 };
    be.infonce_bwd(
        &mut dz,
        &k.z,
        &lse,
        &k.labels,
        &k.anchor,
        &k.partner,
        m,
        c,
        *o,
        scale,
        Precision::Fp32,
    );
    assert_eq!(per_row[m], 9.0, "infonce_fwd wrote past m");
    assert!(dz[m * c..].iter().all(|&x| x == 9.0), "infonce_bwd wrote past m");
    per_row.truncate(m);
    lse.truncate(m);
    dz.truncate(m * c);
    Out {
        loss: infonce_loss_host(&per_row, count),
        per_row,
        lse,
        count,
        dz,
    }
}

fn compare(k: &Case, o: &InfoNceOptions) {
    let what = format!("m={} c={} {o:?}", k.m, k.c);
    let z = to64(&k.z);
    let nv = naive_loss(k, &z, &z, o);
    let got = run_cpu(k, o);
    assert_eq!(got.count, nv.count, "{what}: valid anchor count");
    if nv.count == 0 {
        assert!(
            got.per_row.iter().all(|&x| x == 0.0),
            "{what}: loss without valid anchors"
        );
        assert!(
            got.dz.iter().all(|&x| x == 0.0),
            "{what}: gradient without valid anchors"
        );
        assert_eq!(got.loss, 0.0);
        return;
    }
    // L_i = lse_i - (linear term): a difference of terms of the size of lse, and exactly
    // 0 in some cases (m = 2 under 'all'), so its error is measured relative to the
    // larger of the losses and the lse values.
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let size = norm(&nv.per_row).max(norm(&nv.lse));
    let diff: Vec<f64> = got
        .per_row
        .iter()
        .zip(&nv.per_row)
        .map(|(a, b)| *a as f64 - b)
        .collect();
    let e = norm(&diff) / size;
    assert!(e < FWD_TOL, "{what}: per-row loss rel err {e:.2e}");
    let e = rel_l2(&got.lse, &to32(&nv.lse));
    assert!(e < FWD_TOL, "{what}: lse rel err {e:.2e}");
    let lse_mean = nv.lse.iter().map(|x| x.abs()).sum::<f64>() / nv.count as f64;
    let e = (got.loss as f64 - nv.loss).abs() / nv.loss.abs().max(lse_mean);
    assert!(e < FWD_TOL, "{what}: mean loss {} vs {} ({e:.2e})", got.loss, nv.loss);
    let g = naive_grad(k, &z, o, 1.0 / nv.count as f64);
    let e = rel_l2(&got.dz, &to32(&g));
    assert!(e < GRAD_TOL, "{what}: gradient rel L2 {e:.2e}");
}

#[test]
fn naive_gradient_formula_matches_finite_differences() {
    // Validates the reference before anything is compared with it.
    let mut rng = Rng(21);
    for (m, c) in [(7, 3), (23, 5)] {
        let k = make_case(&mut rng, m, c);
        let z = to64(&k.z);
        for o in all_options(0.2) {
            let nv = naive_loss(&k, &z, &z, &o);
            if nv.count == 0 {
                continue;
            }
            let g = naive_grad(&k, &z, &o, 1.0 / nv.count as f64);
            let fd = if o.detach_columns {
                numeric_grad64(&z, 1e-5, |za| naive_loss(&k, za, &z, &o).loss)
            } else {
                numeric_grad64(&z, 1e-5, |zz| naive_loss(&k, zz, zz, &o).loss)
            };
            let e = rel_l2(&to32(&g), &to32(&fd));
            assert!(e < 1e-6, "naive gradient m={m} {o:?}: {e:.2e}");
        }
    }
}

#[test]
fn infonce_matches_naive_all_options() {
    let mut rng = Rng(22);
    // 130 rows: two column tiles, the second partial; 300: three tiles of anchors
    // under 'all' (see _SPANS_TILES); c up to the MiniLM width.
    for (m, c) in [(1, 4), (2, 3), (7, 5), (37, 17), (130, 33), (300, 384)] {
        let k = make_case(&mut rng, m, c);
        for o in all_options(0.1) {
            compare(&k, &o);
        }
    }
    // another temperature
    let k = make_case(&mut rng, 61, 9);
    for o in all_options(0.05) {
        compare(&k, &o);
    }
}

#[test]
fn infonce_edge_cases() {
    let mut rng = Rng(23);
    let o_all = all_options(0.1);
    // m = 1: the anchor has no other row at all
    let one = Case {
        m: 1,
        c: 3,
        z: unit_rows(&mut rng, 1, 3),
        labels: vec![4],
        anchor: vec![1],
        partner: vec![-1],
    };
    // m = 2, two classes: P_i = {other}; D_i is empty under same-class, {other} under all
    let two = Case {
        m: 2,
        c: 3,
        z: unit_rows(&mut rng, 2, 3),
        labels: vec![0, 1],
        anchor: vec![1, 1],
        partner: vec![-1, -1],
    };
    // one class in the whole batch: no different-class column, every anchor excluded
    let single_class = Case {
        m: 7,
        c: 4,
        z: unit_rows(&mut rng, 7, 4),
        labels: vec![3; 7],
        anchor: vec![1, 1, 0, 1, 1, 1, 0],
        partner: vec![3, -1, -1, 0, -1, -1, -1],
    };
    // rows 0 and 1 are each other's partner and the only members of class 5: under
    // same-class + exclude their D_i is empty; rows 2..6 are anchors of other classes,
    // row 5 is the single member of class 9, row 6 is not an anchor
    let partner_only = Case {
        m: 7,
        c: 6,
        z: unit_rows(&mut rng, 7, 6),
        labels: vec![5, 5, 0, 0, 1, 9, 1],
        anchor: vec![1, 1, 1, 1, 1, 1, 0],
        partner: vec![1, 0, 3, 2, -1, -1, -1],
    };
    for k in [&one, &two, &single_class, &partner_only] {
        for o in &o_all {
            compare(k, o);
        }
    }
    let count = |k: &Case, o: &InfoNceOptions| {
        o.valid_anchors(&k.labels, &k.anchor, &k.partner, k.m)
            .iter()
            .filter(|&&v| v)
            .count()
    };
    for o in &o_all {
        assert_eq!(count(&one, o), 0);
        assert_eq!(count(&single_class, o), 0);
        let expect = match (o.denominator, o.own_view) {
            (Denominator::SameClass, OwnView::Negative) => 5, // rows 0-4; row 5 has no peer
            (Denominator::SameClass, OwnView::Exclude) => 1,  // row 4 (against 6); 0-3 lose their only peer
            (Denominator::All, _) => 6,
        };
        assert_eq!(count(&partner_only, o), expect, "{o:?}");
        assert_eq!(count(&two, o), if o.denominator == Denominator::All { 2 } else { 0 });
    }
}

#[test]
fn infonce_deterministic_across_threads() {
    let mut rng = Rng(24);
    let k = make_case(&mut rng, 300, 40);
    for o in all_options(0.1) {
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        let a = pools[0].install(|| run_cpu(&k, &o));
        let b = pools[1].install(|| run_cpu(&k, &o));
        assert_eq!(a.per_row, b.per_row);
        assert_eq!(a.dz, b.dz);
    }
}

/// Composition x -> l2norm -> infonce -> mean loss, w.r.t. the unnormalised x.
/// Columns not detached: central differences of the CPU ops themselves, in fp32 with the
/// gradcheck tolerance; the step 2.5e-2 balances rounding noise of the fp32 loss (~1/h)
/// against truncation (~h^2), each near 1e-3 at 1e-2 and 6e-2 respectively. Columns detached: the analytic gradient
/// must be the derivative of the loss whose column copy is held fixed, so the reference
/// is the naive f64 loss with separate anchor and column copies, differentiated in the
/// anchor copy only.
#[test]
fn infonce_l2norm_finite_differences() {
    let mut rng = Rng(25);
    for (m, c) in [(9, 4), (40, 6)] {
        let mut k = make_case(&mut rng, m, c);
        let x = rng.vec(m * c, 2.0);
        let (mut z, mut norm) = (vec![0.0; m * c], vec![0.0; m]);
        l2norm::l2norm_fwd(&mut z, &mut norm, &x, m, c);
        k.z = z.clone();
        for o in all_options(0.3) {
            let got = run_cpu(&k, &o);
            if got.count == 0 {
                continue;
            }
            let mut dx = vec![0.0; m * c];
            l2norm::l2norm_bwd(&mut dx, &got.dz, &z, &norm, m, c);
            let what = format!("m={m} {o:?}");
            if !o.detach_columns {
                let mut kk = k.clone();
                let f = |xp: &[f32]| {
                    let (mut zp, mut np) = (vec![0.0; m * c], vec![0.0; m]);
                    l2norm::l2norm_fwd(&mut zp, &mut np, xp, m, c);
                    kk.z = zp;
                    run_cpu(&kk, &o).loss as f64
                };
                let fd = numeric_grad32(&x, 2.5e-2, f);
                let e = rel_l2(&dx, &fd);
                assert!(e < 2e-3, "{what}: rel L2 {e:.2e}");
            } else {
                let x64 = to64(&x);
                let zc = normalise64(&x64, c);
                let fd = numeric_grad64(&x64, 1e-5, |xa| naive_loss(&k, &normalise64(xa, c), &zc, &o).loss);
                let e = rel_l2(&dx, &to32(&fd));
                assert!(e < GRAD_TOL, "{what}: rel L2 {e:.2e}");
            }
        }
    }
}

fn normalise64(x: &[f64], c: usize) -> Vec<f64> {
    let mut z = x.to_vec();
    for row in z.chunks_mut(c) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    z
}

fn numeric_grad32(x: &[f32], h: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            ((up - down) / (2.0 * h as f64)) as f32
        })
        .collect()
}

#[test]
fn infonce_options_serde_names() {
    let o = InfoNceOptions {
        tau: 0.1,
        denominator: Denominator::SameClass,
        own_view: OwnView::Exclude,
        detach_columns: true,
    };
    let s = serde_json::to_string(&o).unwrap();
    assert_eq!(
        s,
        r#"{"tau":0.1,"denominator":"same-class","own-view":"exclude","detach-columns":true}"#
    );
    assert_eq!(serde_json::from_str::<InfoNceOptions>(&s).unwrap(), o);
    assert_eq!(serde_json::to_string(&Denominator::All).unwrap(), r#""all""#);
    assert_eq!(serde_json::to_string(&OwnView::Negative).unwrap(), r#""negative""#);
    assert_eq!(
        InfoNceOptions::default(),
        InfoNceOptions {
            own_view: OwnView::Negative,
            ..o
        }
    );
}

#[test]
fn infonce_free_functions_match_trait() {
    let mut rng = Rng(26);
    let k = make_case(&mut rng, 50, 8);
    let o = InfoNceOptions::default();
    let (mut l1, mut s1) = (vec![0.0; 50], vec![0.0; 50]);
    infonce::infonce_fwd(
        &mut l1,
        &mut s1,
        &k.z,
        &k.labels,
        &k.anchor,
        &k.partner,
        50,
        8,
        o,
        Precision::Fp32,
    );
    let got = run_cpu(&k, &o);
    assert_eq!(l1, got.per_row);
    assert_eq!(s1, got.lse);
}

// ---- l2norm ----------------------------------------------------------------------------

#[test]
fn l2norm_forward_and_grad() {
    let (m, c) = (6, 11);
    let mut rng = Rng(27);
    let (mut x, r) = (rng.vec(m * c, 2.0), rng.vec(m * c, 1.0));
    x[2 * c..3 * c].fill(0.0); // a zero row: maps to zero, gradient dout / eps
    let (mut out, mut norm) = (vec![0.0; m * c], vec![0.0; m]);
    Cpu.l2norm_fwd(&mut out, &mut norm, &x, m, c);
    for i in 0..m {
        let n = x[i * c..(i + 1) * c]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if i == 2 {
            assert_eq!(norm[i], l2norm::L2NORM_EPS);
            assert!(out[i * c..(i + 1) * c].iter().all(|&v| v == 0.0));
            continue;
        }
        assert!((norm[i] as f64 - n).abs() < 1e-6 * n);
        let on: f32 = out[i * c..(i + 1) * c].iter().map(|v| v * v).sum();
        assert!((on - 1.0).abs() < 1e-6);
    }
    let mut dx = vec![0.0; m * c];
    Cpu.l2norm_bwd(&mut dx, &r, &out, &norm, m, c);
    for j in 0..c {
        assert_eq!(dx[2 * c + j], r[2 * c + j] / l2norm::L2NORM_EPS);
    }
    // finite differences on the non-zero rows (probe L = sum(r * out))
    let f = |xp: &[f32]| {
        let (mut o, mut n) = (vec![0.0; m * c], vec![0.0; m]);
        l2norm::l2norm_fwd(&mut o, &mut n, xp, m, c);
        o.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
    };
    let fd = numeric_grad32(&x, 1e-2, f);
    let keep = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| i / c != 2)
            .map(|(_, &x)| x)
            .collect()
    };
    let e = rel_l2(&keep(&dx), &keep(&fd));
    assert!(e < 2e-3, "l2norm rel L2 {e:.2e}");
}

// ---- gather / scatter ------------------------------------------------------------------

#[test]
fn gather_scatter_rows_exact() {
    let (n, c, m) = (9, 5, 7);
    let mut rng = Rng(28);
    let src = rng.vec(n * c, 1.0);
    let idx: Vec<i32> = vec![4, 0, 8, 4, 2, 7, 4]; // row 4 three times
    let mut z = vec![0.0; m * c];
    Cpu.gather_rows(&mut z, &src, &idx, m, c);
    for r in 0..m {
        let i = idx[r] as usize;
        assert_eq!(&z[r * c..(r + 1) * c], &src[i * c..(i + 1) * c]);
    }
    // scatter accumulates into what is there, repeated indices summed in row order
    let dz = rng.vec(m * c, 1.0);
    let base = rng.vec(n * c, 1.0);
    let mut dst = base.clone();
    Cpu.scatter_add_rows(&mut dst, &dz, &idx, m, c);
    let mut expect = base.clone();
    for r in 0..m {
        for j in 0..c {
            expect[idx[r] as usize * c + j] += dz[r * c + j];
        }
    }
    assert_eq!(dst, expect);
    // scatter is gather's adjoint: <gather(src), dz> = <src, scatter(dz)>
    let mut sc = vec![0.0; n * c];
    rows::scatter_add_rows(&mut sc, &dz, &idx, m, c);
    let lhs: f64 = z.iter().zip(&dz).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rhs: f64 = src.iter().zip(&sc).map(|(a, b)| *a as f64 * *b as f64).sum();
    assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0));
}
