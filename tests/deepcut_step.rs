//! The DeepCUT step as a whole: batch assembly (two views of each forget window, CE only
//! on retain rows, partners pairing the views) and the gradient of
//! L = L_CE + gamma * L_f through model -> gather -> l2norm -> InfoNCE -> backward,
//! against finite differences (columns not detached, so the full gradient is the FD one).
mod common;
use common::{rel_l2, window, Rng};
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::backend::{Denominator, InfoNceOptions, OwnView, Precision, IGNORE_INDEX};
use deepcut_fast::data::{PositionStyle, Window};
use deepcut_fast::model::{Dims, Mode, Model};
use deepcut_fast::train::optim::{LossScaler, LossScaling, OptimConfig, Optimizer, UpdateStats};
use deepcut_fast::train::readback::{Ring, StepLosses};
use deepcut_fast::unlearn::deepcut::{assemble, step, step_enqueue, Anchors, Contrast};

fn windows() -> Vec<Window> {
    let i = IGNORE_INDEX;
    vec![
        window(0, &[1, 5, 6, 7, 2], &[i, 0, 1, 2, i]),
        window(1, &[1, 8, 9, 2], &[i, 1, 0, i]),
        window(2, &[1, 4, 3, 5, 6, 2], &[i, 0, i, 2, 0, i]),
        window(3, &[1, 7, 2], &[i, 2, i]),
    ]
}

#[test]
fn assembly_pairs_views_and_masks_forget_ce() {
    let w = windows();
    let (batch, z) = assemble(&w, &[0, 1], &[2, 3], PositionStyle::Absolute, 0, Anchors::All);
    assert_eq!(batch.b, 6);
    // packed: [view a: 5 + 4 tokens | view b: 5 + 4 | retain: 6 + 3]
    assert_eq!(batch.seqs, [0, 5, 9, 14, 18, 24, 27]);
    // forget rows (both views) carry no CE label; retain rows keep theirs
    assert!(batch.inputs.labels[..18].iter().all(|&y| y == IGNORE_INDEX));
    assert_eq!(
        batch.inputs.labels[18..],
        [
            IGNORE_INDEX,
            0,
            IGNORE_INDEX,
            2,
            0,
            IGNORE_INDEX,
            IGNORE_INDEX,
            2,
            IGNORE_INDEX
        ]
    );
    // 5 labelled forget tokens per view, 3 + 1 retain tokens
    assert_eq!(z.idx.len(), 5 + 5 + 4);
    for k in 0..5 {
        assert_eq!(z.partner[k], (5 + k) as i32);
        assert_eq!(z.partner[5 + k], k as i32);
        assert_eq!(z.labels[k], z.labels[5 + k]);
        assert_eq!(
            z.idx[5 + k] as usize,
            z.idx[k] as usize + 9,
            "view b is the same token, one view (9 tokens) later"
        );
    }
    assert!(z.anchor[..10].iter().all(|&a| a == 1) && z.anchor[10..].iter().all(|&a| a == 0));
    assert!(z.partner[10..].iter().all(|&p| p == -1));
    let (_, ze) = assemble(&w, &[0, 1], &[2, 3], PositionStyle::Absolute, 0, Anchors::Entities);
    assert_eq!(
        ze.anchor.iter().sum::<i32>(),
        6,
        "entities: only non-O forget tokens anchor"
    );
}

#[test]
fn deepcut_step_gradient_matches_finite_differences() {
    let mut model = small_model(31, 1, Precision::Fp32);
    let dims = model.dims.clone();
    let w = windows();
    let (batch, z) = assemble(&w, &[0, 1], &[2, 3], PositionStyle::Absolute, 0, Anchors::All);
    let opts = InfoNceOptions {
        tau: 0.5,
        denominator: Denominator::SameClass,
        own_view: OwnView::Negative,
        detach_columns: false,
    };
    let gamma = 0.7;
    let mode = Mode::Train { seed: 3, step: 1 };
    let mut cb = Contrast::new(&model.be, 64, dims.hidden);
    let losses = step(&mut model, &mut cb, &batch, &z, opts, gamma, mode);
    assert!(losses.anchors > 0 && losses.contrast > 0.0 && losses.ce > 0.0);
    let grads = model.export_grads();
    let h = 1e-2f32;
    let mut pick = Rng(5);
    for (pi, (name, g)) in grads.iter().enumerate() {
        let idx: Vec<usize> = (0..6.min(g.len())).map(|_| pick.below(g.len())).collect();
        let (mut a, mut nmr) = (vec![], vec![]);
        for &i in &idx {
            let orig = model.params.iter()[pi].w[i];
            let mut eval = |v: f32, m: &mut Model<Cpu>| {
                m.params.iter_mut()[pi].w[i] = v;
                let l = step(m, &mut cb, &batch, &z, opts, gamma, mode);
                l.ce as f64 + gamma as f64 * l.contrast as f64
            };
            let up = eval(orig + h, &mut model);
            let down = eval(orig - h, &mut model);
            model.params.iter_mut()[pi].w[i] = orig;
            a.push(g[i]);
            nmr.push(((up - down) / (2.0 * h as f64)) as f32);
        }
        if a.iter().chain(&nmr).all(|x| x.abs() < 1e-4) {
            continue; // zero in exact arithmetic (unused embedding rows, key bias)
        }
        let e = rel_l2(&a, &nmr);
        assert!(e < 1e-2, "{name}: rel err {e:.2e}\n analytic {a:?}\n numeric {nmr:?}");
    }
}

/// A tiny model with random weights (LayerNorm scales near 1) and dropout on.
/// The forget sentences embedded once and both views made by the dropout-duplicate pass
/// (`HostBatch::dup`, what `assemble` asks for) against the same batch embedded view by
/// view: the forward pass is bit for bit the same (the masks are those of the views' token
/// indices either way), the gradients the same up to summation order (the two views'
/// gradients meet before the embedding LayerNorm's backward instead of after).
#[test]
fn forget_views_share_one_embedding_with_the_same_step() {
    let w = windows();
    let (batch, z) = assemble(&w, &[0, 1], &[2, 3], PositionStyle::Absolute, 0, Anchors::All);
    assert_eq!(batch.inputs.dup, 2);
    let mut apart = batch.clone();
    apart.inputs.dup = 0;
    let opts = InfoNceOptions::default();
    let mode = Mode::Train { seed: 9, step: 4 };
    let run = |b: &deepcut_fast::data::Batch| {
        let mut model = small_model(41, 2, Precision::Fp32);
        let mut cb = Contrast::new(&model.be, 64, model.dims.hidden);
        let losses = step(&mut model, &mut cb, b, &z, opts, 0.5, mode);
        (losses, model.hidden_host(), model.export_grads())
    };
    let (l1, h1, g1) = run(&batch);
    let (l2, h2, g2) = run(&apart);
    assert_eq!(h1, h2, "final hidden states");
    assert_eq!((l1.ce, l1.contrast), (l2.ce, l2.contrast), "losses");
    for ((name, a), (_, b)) in g1.iter().zip(&g2) {
        let e = rel_l2(a, b);
        assert!(e < 1e-6, "{name}: {e:.2e}");
    }
    // a batch that claims a repeat it does not hold is refused before it reaches a kernel
    let mut bad = batch.clone();
    bad.inputs.input_ids[0] += 1;
    assert!(bad.inputs.check().unwrap_err().contains("not token for token repeats"));
}

fn small_model(seed: u64, layers: usize, precision: Precision) -> Model<Cpu> {
    let dims = Dims {
        vocab: 10,
        max_pos: 8,
        type_vocab: 2,
        hidden: 8,
        layers,
        heads: 2,
        ffn: 12,
        labels: 3,
        eps: 1e-5,
        hidden_dropout: 0.1,
        attn_dropout: 0.1,
        classifier_dropout: 0.1,
    };
    let mut rng = Rng(seed);
    Model::new(Cpu, dims, 64, |name, shape| {
        let n: usize = shape.iter().product();
        if name.ends_with("LayerNorm.weight") {
            (0..n).map(|_| 1.0 + 0.2 * rng.uniform()).collect()
        } else {
            rng.vec(n, 0.5)
        }
    })
    .with_precision(precision)
}

/// What one step gave: losses (CE, contrastive, total), learning rate, gradient norm (NaN
/// when skipped), loss scale, skipped.
type StepNumbers = (f32, f32, f32, f32, f64, f32, bool);

/// What `pipelined_equals_synchronous` saw: the synchronous run's loss scaler, the steps
/// whose norm was above the clip, and the steps the pipelined loop enqueued twice.
struct Seen {
    scaler: Option<LossScaler>,
    clipped: usize,
    redone: usize,
}

/// Runs `steps` DeepCUT steps of a small model twice, as `step` + `Optimizer::update` and
/// pipelined as `run` does (`step_enqueue`, each step finished after the next is enqueued
/// with `Ring::finish_before`, and enqueued again when it says so), and asserts they
/// trained the same: losses, learning rates, loss scales and skips equal, norms to f64
/// precision, weights, moments and the loss scaler's state and history bit for bit.
fn pipelined_equals_synchronous(precision: Precision, scaling: LossScaling, steps: u64) -> Seen {
    let w = windows();
    let opts = InfoNceOptions::default();
    let cfg = OptimConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        warmup: 1,
        total: steps,
        clip: 2.0,
    };
    let batches: [(&[usize], &[usize]); 3] = [(&[0, 1], &[2, 3]), (&[1, 2], &[3, 0]), (&[3], &[0, 1, 2])];
    let numbers = |l: &StepLosses, u: &UpdateStats| -> StepNumbers {
        (l.ce, l.contrast, l.total, u.lr, u.grad_norm, u.loss_scale, u.skipped)
    };
    let mut sync_model = small_model(8, 2, precision);
    let mut sync_opt = Optimizer::new(&sync_model, cfg).with_precision(precision, scaling);
    let mut cb = Contrast::new(&sync_model.be, 64, 8);
    let mut want = vec![];
    for s in 0..steps {
        let (f, r) = batches[s as usize % 3];
        let (batch, z) = assemble(&w, f, r, PositionStyle::Absolute, 0, Anchors::All);
        sync_model.set_loss_scale(sync_opt.loss_scale());
        let l = step(
            &mut sync_model,
            &mut cb,
            &batch,
            &z,
            opts,
            0.5,
            Mode::Train { seed: 4, step: s },
        );
        let u = sync_opt.update(&mut sync_model).expect("finite");
        want.push(numbers(&l, &u));
    }
    let mut model = small_model(8, 2, precision);
    let mut opt = Optimizer::new(&model, cfg).with_precision(precision, scaling);
    let mut cb = Contrast::new(&model.be, 64, 8);
    let mut ring = Ring::new(&model.be, 64);
    let mut got = vec![];
    let enqueue =
        |model: &mut Model<Cpu>, cb: &mut Contrast<Cpu>, opt: &mut Optimizer<Cpu>, ring: &mut Ring<Cpu>, s| {
            let (f, r) = batches[s as usize % 3];
            let (batch, z) = assemble(&w, f, r, PositionStyle::Absolute, 0, Anchors::All);
            model.set_loss_scale(opt.loss_scale());
            let mode = Mode::Train { seed: 4, step: s };
            step_enqueue(model, cb, &batch, &z, opts, 0.5, mode, opt, ring.slot(s));
            assert!(ring.slot(s).in_flight());
        };
    let mut redone = 0;
    for s in 0..steps {
        enqueue(&mut model, &mut cb, &mut opt, &mut ring, s);
        if s > 0 {
            let (f, again) = ring.finish_before(s - 1, &model.be, &mut opt);
            got.push(numbers(&f.losses, &f.update.expect("finite")));
            if again {
                redone += 1;
                enqueue(&mut model, &mut cb, &mut opt, &mut ring, s);
            }
        }
    }
    let f = ring.finish(steps - 1, &model.be, &mut opt).expect("in flight");
    got.push(numbers(&f.losses, &f.update.expect("finite")));
    assert!(
        (0..2).all(|s| ring.finish(s, &model.be, &mut opt).is_none()),
        "{precision}: nothing left in flight"
    );
    assert_eq!(got.len(), want.len());
    let mut clipped = 0;
    for (s, (g, e)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (g.0, g.1, g.2, g.3, g.5, g.6),
            (e.0, e.1, e.2, e.3, e.5, e.6),
            "{precision} step {s}: losses, lr, scale, skipped"
        );
        // the norm crosses an fp32 buffer as a hi + lo pair: f64 to about 2^-48
        assert!(
            (g.4 - e.4).abs() <= 1e-13 * e.4 || (e.6 && g.4.is_nan() && e.4.is_nan()),
            "{precision} step {s}: norm {} vs {}",
            g.4,
            e.4
        );
        clipped += (e.4 > cfg.clip as f64) as usize;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for ((name, _, a), (_, _, b)) in model.export().iter().zip(sync_model.export()) {
        assert!(
            bits(a) == bits(&b),
            "{precision}: {name} differs from the synchronous update"
        );
    }
    let (m, v) = opt.export(&model);
    let (sm, sv) = sync_opt.export(&sync_model);
    for (a, b) in m.iter().chain(&v).zip(sm.iter().chain(&sv)) {
        assert!(bits(a) == bits(b), "{precision}: AdamW moments differ");
    }
    assert_eq!(opt.step, sync_opt.step, "{precision}: applied steps");
    assert_eq!(opt.scaler, sync_opt.scaler, "{precision}: loss scaler");
    Seen {
        scaler: sync_opt.scaler,
        clipped,
        redone,
    }
}

/// Issue #6: `step_enqueue` (the device decides the clipping, the numbers come back a step
/// late through a `Readback`) trains exactly as `step` + `Optimizer::update`: the same
/// losses, learning rates and norms, and the same weights bit for bit, in every precision.
/// The learning rate is high enough that clipping at 2 is active on some steps and not on
/// others.
#[test]
fn pipelined_steps_equal_step_then_update() {
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let scaling = LossScaling {
            init: 1024.0,
            growth_interval: 2,
        };
        let seen = pipelined_equals_synchronous(precision, scaling, 6);
        assert!(
            seen.clipped > 0 && seen.clipped < 6,
            "{precision}: clipping must be active on some steps only ({} of 6)",
            seen.clipped
        );
        assert_eq!(seen.redone, 0, "{precision}: no overflow, nothing enqueued twice");
    }
}

/// fp16 without waiting for the overflow check: each step is enqueued at the loss scale
/// the step before leaves if it applies. When that step overflowed instead, the device
/// skips the next one as stale and the loop enqueues it again at the halved scale; the
/// training is `update`'s bit for bit (skips, halvings, growths, weights, moments). The
/// first scale is high enough to overflow several times, growth every 2 clean steps
/// overflows again.
#[test]
fn pipelined_fp16_redoes_the_step_after_an_overflow_and_equals_update() {
    let scaling = LossScaling {
        init: 2f32.powi(INIT_LOG2),
        growth_interval: 2,
    };
    let seen = pipelined_equals_synchronous(Precision::Fp16, scaling, 14);
    let sc = seen.scaler.expect("fp16 has a loss scaler");
    let reasons: Vec<&str> = sc.history.iter().map(|c| c.reason.as_str()).collect();
    eprintln!("loss scale 2^{INIT_LOG2}: {reasons:?}, {} redone", seen.redone);
    assert!(sc.skipped_steps >= 2, "{reasons:?}");
    assert!(reasons.contains(&"growth"), "{reasons:?}");
    let after_growth = reasons.windows(2).any(|w| w == ["growth", "overflow"]);
    assert!(after_growth, "an overflow after a growth: {reasons:?}");
    // every overflow but one finished with nothing after it in flight had its next step
    // enqueued twice
    assert!(
        seen.redone as u64 + 1 >= sc.skipped_steps && seen.redone >= 1,
        "{} redone for {} skips",
        seen.redone,
        sc.skipped_steps
    );
}

const INIT_LOG2: i32 = 20;

/// The fp16 decisions behind the pipelined loops, on gradients set by hand: updates
/// enqueued back to back (finite, overflowing, finite) finish as applied, overflowed
/// (skipped, the scale halved to 1) and stale (nothing applied, the optimiser as before it);
/// an overflow at loss scale 1 is then the error `update` gives, at the same attempted step.
/// The weights are `update`'s bit for bit.
#[test]
fn pipelined_fp16_optimiser_decides_as_update_down_to_the_error_at_scale_one() {
    use deepcut_fast::backend::{Backend, ClipStats};
    use deepcut_fast::train::optim::Finish;
    let cfg = OptimConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        warmup: 0,
        total: 10,
        clip: 1.0,
    };
    let scaling = LossScaling {
        init: 2.0,
        growth_interval: 2000,
    };
    let set_grads = |model: &mut Model<Cpu>, overflow: bool| {
        let be = &model.be;
        for (i, p) in model.params.iter_mut().into_iter().enumerate() {
            let mut g: Vec<f32> = (0..p.numel()).map(|k| ((k * 7 + i) % 13) as f32 * 1e-3).collect();
            if overflow && i == 3 {
                g[0] = f32::INFINITY;
            }
            be.upload(&mut p.g, &g);
        }
    };
    let mut sync = small_model(3, 1, Precision::Fp16);
    let mut sopt = Optimizer::new(&sync, cfg).with_precision(Precision::Fp16, scaling);
    set_grads(&mut sync, false);
    assert!(!sopt.update(&mut sync).unwrap().skipped);
    set_grads(&mut sync, true);
    assert!(sopt.update(&mut sync).unwrap().skipped);
    set_grads(&mut sync, true);
    let want = sopt.update(&mut sync).expect_err("overflow at scale 1").to_string();

    let mut model = small_model(3, 1, Precision::Fp16);
    let mut opt = Optimizer::new(&model, cfg).with_precision(Precision::Fp16, scaling);
    let mut staged: Vec<_> = (0..4).map(|_| model.be.staging(ClipStats::LEN)).collect();
    let mut enqueued = vec![];
    for (k, overflow) in [false, true, false].into_iter().enumerate() {
        set_grads(&mut model, overflow);
        enqueued.push(opt.update_enqueue(&mut model, &mut staged[k]));
    }
    let finish = |opt: &mut Optimizer<Cpu>, k: usize, e| opt.finish(&Cpu, e, &staged[k]);
    match finish(&mut opt, 0, enqueued[0]).unwrap() {
        Finish::Update(u) => assert!(!u.skipped && u.loss_scale == 2.0),
        Finish::Stale => panic!("update 1 stale"),
    }
    match finish(&mut opt, 1, enqueued[1]).unwrap() {
        Finish::Update(u) => assert!(u.skipped && u.grad_norm.is_nan() && u.loss_scale == 2.0),
        Finish::Stale => panic!("update 2 stale"),
    }
    assert_eq!(
        (opt.step, opt.loss_scale()),
        (1, 1.0),
        "back to one applied step, halved"
    );
    assert!(matches!(finish(&mut opt, 2, enqueued[2]).unwrap(), Finish::Stale));
    assert_eq!((opt.step, opt.loss_scale()), (1, 1.0), "a stale update changes nothing");
    set_grads(&mut model, true);
    let e = opt.update_enqueue(&mut model, &mut staged[3]);
    let got = opt
        .finish(&model.be, e, &staged[3])
        .expect_err("overflow at scale 1")
        .to_string();
    assert_eq!(got, want);
    assert_eq!(opt.scaler, sopt.scaler);
    for ((name, _, a), (_, _, b)) in model.export().iter().zip(sync.export()) {
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs from update's"
        );
    }
}
