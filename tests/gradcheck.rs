//! Finite-difference checks of every CPU op's backward, and of the whole model.
//!
//! Each op is checked through a scalar probe L = sum(r * out) with fixed random r, so
//! dL/dout = r: the analytic input gradient from the op's backward must match central
//! differences of L. Ops are fp32, so differences use a step of 1e-2 and the probe is
//! summed in f64; the tolerance (relative L2 over the whole gradient) is set well above
//! the finite-difference error and far below what any wrong term produces.
mod common;
use common::{rel_l2, Rng};
use deepcut_fast::backend::cpu::{attention, dropout, embedding, gelu, gemm, layernorm, softmax_ce};
use deepcut_fast::backend::{embedding_order, Dropout, Precision, IGNORE_INDEX};

const STEP: f32 = 1e-2;
const TOL: f64 = 2e-3;

fn probe(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Central differences of `f` w.r.t. every element of `x`.
fn numeric_grad(x: &[f32], mut f: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + STEP;
            let up = f(&xp);
            xp[i] = orig - STEP;
            let down = f(&xp);
            xp[i] = orig;
            ((up - down) / (2.0 * STEP as f64)) as f32
        })
        .collect()
}

fn check(name: &str, analytic: &[f32], numeric: &[f32]) {
    let e = rel_l2(analytic, numeric);
    assert!(
        e < TOL,
        "{name}: relative L2 error {e:.2e} (analytic {:?}.. numeric {:?}..)",
        &analytic[..4.min(analytic.len())],
        &numeric[..4.min(numeric.len())]
    );
}

#[test]
fn gemm_grad() {
    let (m, n, k) = (5, 7, 3);
    let mut rng = Rng(1);
    let (a, b, r) = (rng.vec(m * k, 1.0), rng.vec(n * k, 1.0), rng.vec(m * n, 1.0));
    // c = a b^T (the linear-layer form); dA = r b, dB = r^T a
    let f = |a: &[f32], b: &[f32]| {
        let mut c = vec![0.0; m * n];
        gemm::gemm(&mut c, a, b, m, n, k, false, true, 1.0, 0.0);
        probe(&c, &r)
    };
    let mut da = vec![0.0; m * k];
    gemm::gemm(&mut da, &r, &b, m, k, n, false, false, 1.0, 0.0);
    let mut db = vec![0.0; n * k];
    gemm::gemm(&mut db, &r, &a, n, k, m, true, false, 1.0, 0.0);
    check("gemm dA", &da, &numeric_grad(&a, |x| f(x, &b)));
    check("gemm dB", &db, &numeric_grad(&b, |x| f(&a, x)));
    // transposed-a path with beta accumulation: c = 2 a^T b + 1 c
    let mut c0 = rng.vec(m * n, 1.0);
    let at = rng.vec(k * m, 1.0);
    let bb = rng.vec(k * n, 1.0);
    let mut expect = c0.clone();
    for i in 0..m {
        for j in 0..n {
            let s: f32 = (0..k).map(|p| at[p * m + i] * bb[p * n + j]).sum();
            expect[i * n + j] += 2.0 * s;
        }
    }
    gemm::gemm(&mut c0, &at, &bb, m, n, k, true, false, 2.0, 1.0);
    assert!(rel_l2(&c0, &expect) < 1e-6);
}

#[test]
fn layernorm_grad_with_residual() {
    let (n, c) = (6, 17);
    let mut rng = Rng(2);
    let (x, res, w, b, r) = (
        rng.vec(n * c, 2.0),
        rng.vec(n * c, 1.0),
        rng.vec(c, 1.5),
        rng.vec(c, 0.5),
        rng.vec(n * c, 1.0),
    );
    let f = |x: &[f32], res: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mu, mut rs) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        let off = Dropout::OFF;
        layernorm::layernorm_fwd(
            &mut out,
            &mut mu,
            &mut rs,
            x,
            off,
            Some(res),
            w,
            b,
            n,
            c,
            1e-5,
            Precision::Fp32,
        );
        probe(&out, &r)
    };
    let (mut out, mut mu, mut rs) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let (off, fp32) = (Dropout::OFF, Precision::Fp32);
    layernorm::layernorm_fwd(
        &mut out,
        &mut mu,
        &mut rs,
        &x,
        off,
        Some(&res),
        &w,
        &b,
        n,
        c,
        1e-5,
        fp32,
    );
    let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    layernorm::layernorm_bwd(
        &mut dx,
        None,
        &mut dw,
        &mut db,
        &r,
        &x,
        off,
        Some(&res),
        &w,
        &mu,
        &rs,
        n,
        c,
        fp32,
    );
    check("layernorm dx", &dx, &numeric_grad(&x, |v| f(v, &res, &w, &b)));
    check("layernorm dresidual", &dx, &numeric_grad(&res, |v| f(&x, v, &w, &b)));
    check("layernorm dw", &dw, &numeric_grad(&w, |v| f(&x, &res, v, &b)));
    check("layernorm db", &db, &numeric_grad(&b, |v| f(&x, &res, &w, v)));
}

/// The fused dropout + LayerNorm (the encoder's residual LayerNorms) is bit for bit
/// dropout_fwd then layernorm_fwd, and its backward layernorm_bwd then dropout_bwd: with and
/// without a residual and dropout, fp32 and bf16 rounding, c odd (rows start inside a Philox
/// counter group) and rows across several of the backward's chunks.
#[test]
fn dropout_layernorm_is_dropout_then_layernorm() {
    use deepcut_fast::backend::cpu::gemm::REDUCE_ROWS;
    let (n, c) = (2 * REDUCE_ROWS + 5, 37);
    let mut rng = Rng(21);
    let (x, res, w, b, g) = (
        rng.vec(n * c, 2.0),
        rng.vec(n * c, 1.0),
        rng.vec(c, 1.5),
        rng.vec(c, 0.5),
        rng.vec(n * c, 1.0),
    );
    for d in [Dropout::OFF, Dropout::new(0.1, 7, 3, 9)] {
        for residual in [None, Some(&res[..])] {
            for rounding in [Precision::Fp32, Precision::Bf16] {
                let tag = format!("p={} residual={} {rounding}", d.p, residual.is_some());
                let z = || vec![0f32; n * c];
                let (mut dropped, mut out_a, mut out_b) = (z(), z(), z());
                let (mut mu_a, mut rs_a, mut mu_b, mut rs_b) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                dropout::dropout_fwd(&mut dropped, &x, n * c, d, Precision::Fp32);
                let off = Dropout::OFF;
                layernorm::layernorm_fwd(
                    &mut out_a, &mut mu_a, &mut rs_a, &dropped, off, residual, &w, &b, n, c, 1e-5, rounding,
                );
                layernorm::layernorm_fwd(
                    &mut out_b, &mut mu_b, &mut rs_b, &x, d, residual, &w, &b, n, c, 1e-5, rounding,
                );
                assert_eq!(out_a, out_b, "{tag}: forward");
                assert_eq!((&mu_a, &rs_a), (&mu_b, &rs_b), "{tag}: statistics");
                let (mut ds_a, mut dx_a, mut ds_b, mut dx_b) = (z(), z(), z(), z());
                let (mut dw_a, mut db_a) = (vec![0.5; c], vec![0.25; c]);
                let (mut dw_b, mut db_b) = (dw_a.clone(), db_a.clone());
                layernorm::layernorm_bwd(
                    &mut ds_a,
                    None,
                    &mut dw_a,
                    &mut db_a,
                    &g,
                    &dropped,
                    off,
                    residual,
                    &w,
                    &mu_a,
                    &rs_a,
                    n,
                    c,
                    Precision::Fp32,
                );
                dropout::dropout_bwd(&mut dx_a, &ds_a, n * c, d, rounding);
                layernorm::layernorm_bwd(
                    &mut ds_b,
                    Some(&mut dx_b),
                    &mut dw_b,
                    &mut db_b,
                    &g,
                    &x,
                    d,
                    residual,
                    &w,
                    &mu_b,
                    &rs_b,
                    n,
                    c,
                    rounding,
                );
                assert_eq!(ds_a, ds_b, "{tag}: residual gradient");
                assert_eq!(dx_a, dx_b, "{tag}: input gradient");
                assert_eq!((&dw_a, &db_a), (&dw_b, &db_b), "{tag}: parameter gradients");
                if d.is_on() {
                    assert!(
                        dx_b.iter().filter(|v| **v == 0.0).count() > n * c / 20,
                        "{tag}: nothing dropped"
                    );
                }
            }
        }
    }
}

#[test]
fn bias_gelu_grad() {
    let (n, c) = (5, 9);
    let mut rng = Rng(3);
    let (x, bias, r) = (rng.vec(n * c, 3.0), rng.vec(c, 1.0), rng.vec(n * c, 1.0));
    let f = |x: &[f32], bias: &[f32]| {
        let mut out = vec![0.0; n * c];
        gelu::bias_gelu_fwd(&mut out, x, bias, n, c, Precision::Fp32);
        probe(&out, &r)
    };
    let (mut dx, mut db) = (vec![0.0; n * c], vec![0.0; c]);
    gelu::bias_gelu_bwd(&mut dx, &mut db, &r, &x, &bias, n, c, Precision::Fp32);
    check("gelu dx", &dx, &numeric_grad(&x, |v| f(v, &bias)));
    check("gelu dbias", &db, &numeric_grad(&bias, |v| f(&x, v)));
    // erf-form values (torch.nn.functional.gelu): gelu(1) = 0.8413447, gelu(-0.5) = -0.1542687
    assert!((gelu::gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((gelu::gelu(-0.5) + 0.154_268_7).abs() < 1e-6);
}

#[test]
fn attention_grad_packed_sequences_and_dropout() {
    // three packed sequences of 5, 3 and 1 tokens (and an empty one): n = 9, t = 5
    let (b, t, h, d) = (4, 5, 2, 3);
    let seqs = [0, 5, 8, 8, 9];
    let n = 9;
    let c = h * d;
    let mut rng = Rng(4);
    let (q, k, v, r) = (
        rng.vec(n * c, 1.0),
        rng.vec(n * c, 1.0),
        rng.vec(n * c, 1.0),
        rng.vec(n * c, 1.0),
    );
    let fwd = |q: &[f32], k: &[f32], v: &[f32], seqs: &[i32], b: usize, n: usize, drop: Dropout| {
        let (mut out, mut lse) = (vec![0.0; n * c], vec![0.0; n * h]);
        attention::attention_fwd(&mut out, &mut lse, q, k, v, seqs, b, n, t, h, d, drop, Precision::Fp32);
        (out, lse)
    };
    for drop in [Dropout::OFF, Dropout::new(0.3, 7, 1, 2)] {
        let f = |q: &[f32], k: &[f32], v: &[f32]| probe(&fwd(q, k, v, &seqs, b, n, drop).0, &r);
        let (out, lse) = fwd(&q, &k, &v, &seqs, b, n, drop);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * c], vec![0.0; n * c], vec![0.0; n * c]);
        attention::attention_bwd(
            &mut dq,
            &mut dk,
            &mut dv,
            &r,
            &q,
            &k,
            &v,
            &out,
            &lse,
            &seqs,
            b,
            n,
            t,
            h,
            d,
            drop,
            Precision::Fp32,
        );
        check("attention dq", &dq, &numeric_grad(&q, |x| f(x, &k, &v)));
        check("attention dk", &dk, &numeric_grad(&k, |x| f(&q, x, &v)));
        check("attention dv", &dv, &numeric_grad(&v, |x| f(&q, &k, x)));
        // the keys and values of sequence 1 (tokens 5..8) must not reach sequences 0 and 2
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for x in k2[5 * c..8 * c].iter_mut().chain(v2[5 * c..8 * c].iter_mut()) {
            *x += 5.0;
        }
        let (out2, _) = fwd(&q, &k2, &v2, &seqs, b, n, drop);
        for tok in (0..5).chain(8..9) {
            assert_eq!(
                out[tok * c..(tok + 1) * c],
                out2[tok * c..(tok + 1) * c],
                "token {tok}: another sequence leaked in"
            );
        }
        assert_ne!(out[5 * c..8 * c], out2[5 * c..8 * c], "sequence 1 ignores its own keys");
    }
    // without dropout, a packed sequence gets exactly what it gets alone
    let (out, lse) = fwd(&q, &k, &v, &seqs, b, n, Dropout::OFF);
    for r in 0..b {
        let (s0, s1) = (seqs[r] as usize, seqs[r + 1] as usize);
        let part = |x: &[f32]| x[s0 * c..s1 * c].to_vec();
        let len = s1 - s0;
        let (o1, l1) = fwd(&part(&q), &part(&k), &part(&v), &[0, len as i32], 1, len, Dropout::OFF);
        assert_eq!(o1, out[s0 * c..s1 * c], "sequence {r} packed vs alone");
        assert_eq!(l1, lse[s0 * h..s1 * h], "sequence {r} lse packed vs alone");
    }
}

#[test]
fn dropout_grad_and_rate() {
    let n = 1000;
    let mut rng = Rng(5);
    let (x, r) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
    let d = Dropout::new(0.25, 3, 9, 1);
    let mut out = vec![0.0; n];
    dropout::dropout_fwd(&mut out, &x, n, d, Precision::Fp32);
    let mut dx = vec![0.0; n];
    dropout::dropout_bwd(&mut dx, &r, n, d, Precision::Fp32);
    // linear op: gradient is the mask itself
    for i in 0..n {
        let keep = out[i] != 0.0;
        assert_eq!(dx[i] != 0.0, keep);
        if keep {
            assert!((out[i] - x[i] / 0.75).abs() < 1e-6 && (dx[i] - r[i] / 0.75).abs() < 1e-6);
        }
    }
    let dropped = out.iter().filter(|&&v| v == 0.0).count();
    assert!((200..300).contains(&dropped), "dropped {dropped} of {n}");
}

#[test]
fn dropout_duplicate_is_dropout_of_the_doubled_input() {
    // n and n_dup not multiples of 4 (view b and the rest start inside a Philox counter
    // group) nor of the chunk; none, some and all of the input repeated
    let n = 4099;
    let mut rng = Rng(15);
    let x = rng.vec(n, 1.0);
    let d = Dropout::new(0.3, 11, 2, 5);
    for (nd, rounding) in [
        (1501, Precision::Fp32),
        (1501, Precision::Bf16),
        (0, Precision::Fp32),
        (n, Precision::Fp16),
    ] {
        let doubled: Vec<f32> = x[..nd].iter().chain(&x).copied().collect();
        let mut expect = vec![0.0; n + nd];
        dropout::dropout_fwd(&mut expect, &doubled, n + nd, d, rounding);
        let mut out = vec![0.0; n + nd];
        dropout::dropout_duplicate(&mut out, &x, nd, n, d, rounding);
        assert_eq!(out, expect, "n_dup {nd} {rounding}");
        if nd > 0 {
            assert_ne!(out[..nd], out[nd..2 * nd], "the two views must have different masks");
        }
        // backward: the adjoint, the two views' r * mask summed where the input is repeated
        let r = rng.vec(n + nd, 1.0);
        let mut dr = vec![0.0; n + nd];
        dropout::dropout_bwd(&mut dr, &r, n + nd, d, Precision::Fp32);
        let expect: Vec<f32> = (0..n)
            .map(|i| if i < nd { dr[i] + dr[nd + i] } else { dr[nd + i] })
            .collect();
        let mut dx = vec![0.0; n];
        dropout::dropout_duplicate_bwd(&mut dx, &r, nd, n, d);
        assert_eq!(dx, expect, "n_dup {nd} backward");
    }
}

#[test]
fn embedding_grad() {
    let (n, c, vocab, npos, ntype) = (7, 4, 5, 6, 2);
    let mut rng = Rng(6);
    let ids: Vec<i32> = vec![0, 3, 3, 1, 4, 3, 0];
    let pos: Vec<i32> = (0..n as i32).map(|i| i % npos as i32).collect();
    let types: Vec<i32> = vec![0, 1, 0, 0, 1, 1, 0];
    let (wte, wpe, wtt, r) = (
        rng.vec(vocab * c, 1.0),
        rng.vec(npos * c, 1.0),
        rng.vec(ntype * c, 1.0),
        rng.vec(n * c, 1.0),
    );
    let f = |wte: &[f32], wpe: &[f32], wtt: &[f32]| {
        let mut out = vec![0.0; n * c];
        embedding::embedding_fwd(&mut out, &ids, &pos, &types, wte, wpe, wtt, n, c);
        probe(&out, &r)
    };
    let (mut dte, mut dpe, mut dtt) = (vec![0.0; vocab * c], vec![0.0; npos * c], vec![0.0; ntype * c]);
    let order = embedding_order(&ids, &pos, &types);
    embedding::embedding_bwd(&mut dte, &mut dpe, &mut dtt, &r, &ids, &pos, &types, &order, n, c);
    check("embedding dwte", &dte, &numeric_grad(&wte, |x| f(x, &wpe, &wtt)));
    check("embedding dwpe", &dpe, &numeric_grad(&wpe, |x| f(&wte, x, &wtt)));
    check("embedding dwtt", &dtt, &numeric_grad(&wtt, |x| f(&wte, &wpe, x)));
}

/// The scatter order is every token once, sorted by (index, token); walking it, the
/// embedding backward adds each table row's tokens in token order: bit for bit the plain
/// per-token loop, on a batch where one id takes most tokens (padding) and the rest repeat.
#[test]
fn embedding_bwd_walks_the_order_in_token_order() {
    let (n, c, vocab) = (517, 37, 60);
    let mut rng = Rng(16);
    let ids: Vec<i32> = (0..n)
        .map(|r| if r % 3 == 0 { 1 } else { rng.below(vocab) as i32 })
        .collect();
    let pos: Vec<i32> = (0..n).map(|r| (r % 128) as i32).collect();
    let types: Vec<i32> = (0..n).map(|r| (r % 7 == 0) as i32).collect();
    let order = embedding_order(&ids, &pos, &types);
    for (t, idx) in [&ids, &pos, &types].into_iter().enumerate() {
        let o = &order[t * n..(t + 1) * n];
        let mut seen = vec![false; n];
        for w in o.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            assert!(
                (idx[a], a) < (idx[b], b),
                "table {t}: order not sorted by (index, token)"
            );
        }
        o.iter().for_each(|&r| seen[r as usize] = true);
        assert!(seen.iter().all(|&s| s), "table {t}: order is not a permutation");
    }
    let dout = rng.vec(n * c, 1.0);
    let mut init = |rows: usize| rng.vec(rows * c, 1.0);
    let (wte0, wpe0, wtt0) = (init(vocab), init(128), init(2));
    let (mut a, mut b, mut d) = (wte0.clone(), wpe0.clone(), wtt0.clone());
    embedding::embedding_bwd(&mut a, &mut b, &mut d, &dout, &ids, &pos, &types, &order, n, c);
    let (mut a2, mut b2, mut d2) = (wte0, wpe0, wtt0);
    for (table, idx) in [(&mut a2, &ids), (&mut b2, &pos), (&mut d2, &types)] {
        for r in 0..n {
            let i = idx[r] as usize;
            for j in 0..c {
                table[i * c + j] += dout[r * c + j];
            }
        }
    }
    assert_eq!((a, b, d), (a2, b2, d2), "not the per-token loop's bits");
}

#[test]
fn softmax_ce_grad_with_ignore() {
    let (n, v) = (6, 5);
    let mut rng = Rng(7);
    let logits = rng.vec(n * v, 3.0);
    let labels = vec![0, 4, IGNORE_INDEX, 2, 2, IGNORE_INDEX];
    let f = |x: &[f32]| {
        let mut l = vec![0.0; n];
        softmax_ce::softmax_ce_fwd(&mut l, x, &labels, n, v);
        l.iter().map(|&x| x as f64).sum::<f64>() / 4.0
    };
    let mut dl = vec![0.0; n * v];
    softmax_ce::softmax_ce_bwd(&mut dl, &logits, &labels, n, v, 0.25);
    check("softmax_ce dlogits", &dl, &numeric_grad(&logits, f));
    assert!(dl[2 * v..3 * v].iter().all(|&x| x == 0.0));
    // value check: -log softmax
    let mut l = vec![0.0; n];
    softmax_ce::softmax_ce_fwd(&mut l, &logits, &labels, n, v);
    let row = &logits[v..2 * v];
    let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    assert!((l[1] as f64 - (lse - row[4] as f64)).abs() < 1e-5);
    assert_eq!(l[2], 0.0);
}

#[test]
fn bias_grad_is_column_sum() {
    let (n, c) = (150, 3); // more rows than one reduction chunk
    let mut rng = Rng(8);
    let dout = rng.vec(n * c, 1.0);
    let mut db = vec![1.0; c];
    gemm::bias_grad(&mut db, &dout, n, c);
    for j in 0..c {
        let s: f64 = (0..n).map(|i| dout[i * c + j] as f64).sum::<f64>() + 1.0;
        assert!((db[j] as f64 - s).abs() < 1e-4);
    }
}
