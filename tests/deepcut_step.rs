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
use deepcut_fast::train::optim::{LossScaling, OptimConfig, Optimizer};
use deepcut_fast::train::readback::Ring;
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
    let (batch, z) = assemble(&w, &[0, 1], &[2, 3], 0, PositionStyle::Absolute, 0, Anchors::All);
    assert_eq!(batch.b, 6);
    let t = batch.t;
    // forget rows (both views) carry no CE label; retain rows keep theirs
    assert!(batch.inputs.labels[..4 * t].iter().all(|&y| y == IGNORE_INDEX));
    assert_eq!(batch.inputs.labels[4 * t + 1], 0);
    // 5 labelled forget tokens per view, 3 + 1 retain tokens
    assert_eq!(z.idx.len(), 5 + 5 + 4);
    for k in 0..5 {
        assert_eq!(z.partner[k], (5 + k) as i32);
        assert_eq!(z.partner[5 + k], k as i32);
        assert_eq!(z.labels[k], z.labels[5 + k]);
        assert_eq!(
            z.idx[5 + k] as usize,
            z.idx[k] as usize + 2 * t,
            "view b is the same token two rows later"
        );
    }
    assert!(z.anchor[..10].iter().all(|&a| a == 1) && z.anchor[10..].iter().all(|&a| a == 0));
    assert!(z.partner[10..].iter().all(|&p| p == -1));
    let (_, ze) = assemble(&w, &[0, 1], &[2, 3], 0, PositionStyle::Absolute, 0, Anchors::Entities);
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
    let (batch, z) = assemble(&w, &[0, 1], &[2, 3], 0, PositionStyle::Absolute, 0, Anchors::All);
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

/// Issue #6: `step_enqueue` (the device decides the clipping, the numbers come back a step
/// late through a `Readback`) trains exactly as `step` + `Optimizer::update`: the same
/// losses, learning rates and norms, and the same weights bit for bit, in every precision
/// (fp16's loss-scaled update is `update` itself). The learning rate is high enough that
/// clipping at 2 is active on some steps and not on others.
#[test]
fn pipelined_steps_equal_step_then_update() {
    let w = windows();
    let opts = InfoNceOptions::default();
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let cfg = OptimConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            warmup: 1,
            total: 6,
            clip: 2.0,
        };
        let scaling = LossScaling {
            init: 1024.0,
            growth_interval: 2,
        };
        let batches: [(&[usize], &[usize]); 3] = [(&[0, 1], &[2, 3]), (&[1, 2], &[3, 0]), (&[3], &[0, 1, 2])];
        let mut sync_model = small_model(8, 2, precision);
        let mut sync_opt = Optimizer::new(&sync_model, cfg).with_precision(precision, scaling);
        let mut cb = Contrast::new(&sync_model.be, 64, 8);
        let mut want = vec![];
        for s in 0..6u64 {
            let (f, r) = batches[s as usize % 3];
            let (batch, z) = assemble(&w, f, r, 0, PositionStyle::Absolute, 0, Anchors::All);
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
            want.push((l.ce, l.contrast, l.total, u.lr, u.grad_norm, u.loss_scale));
        }
        let mut model = small_model(8, 2, precision);
        let mut opt = Optimizer::new(&model, cfg).with_precision(precision, scaling);
        let mut cb = Contrast::new(&model.be, 64, 8);
        let mut ring = Ring::new(&model.be, 64);
        let mut got = vec![];
        let mut finish = |ring: &mut Ring<Cpu>, s: u64, be: &Cpu| {
            let f = ring.finish(s, be).expect("in flight");
            let u = f.update.expect("finite");
            let l = f.losses;
            got.push((l.ce, l.contrast, l.total, u.lr, u.grad_norm, u.loss_scale));
        };
        for s in 0..6u64 {
            let (f, r) = batches[s as usize % 3];
            let (batch, z) = assemble(&w, f, r, 0, PositionStyle::Absolute, 0, Anchors::All);
            model.set_loss_scale(opt.loss_scale());
            step_enqueue(
                &mut model,
                &mut cb,
                &batch,
                &z,
                opts,
                0.5,
                Mode::Train { seed: 4, step: s },
                &mut opt,
                ring.slot(s),
            )
            .expect("enqueued");
            assert!(ring.slot(s).in_flight());
            if s > 0 {
                finish(&mut ring, s - 1, &model.be);
            }
        }
        finish(&mut ring, 5, &model.be);
        assert!(
            (0..2).all(|s| ring.finish(s, &model.be).is_none()),
            "{precision}: nothing left in flight"
        );
        assert_eq!(got.len(), want.len());
        let mut clipped = 0;
        for (s, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                (g.0, g.1, g.2, g.3, g.5),
                (e.0, e.1, e.2, e.3, e.5),
                "{precision} step {s}: losses, lr, scale"
            );
            // the norm crosses an fp32 buffer as a hi + lo pair: f64 to about 2^-48
            assert!(
                (g.4 - e.4).abs() <= 1e-13 * e.4,
                "{precision} step {s}: norm {} vs {}",
                g.4,
                e.4
            );
            clipped += (e.4 > cfg.clip as f64) as usize;
        }
        assert!(
            clipped > 0 && clipped < 6,
            "{precision}: clipping must be active on some steps only ({clipped} of 6)"
        );
        for ((name, _, a), (_, _, b)) in model.export().iter().zip(sync_model.export()) {
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{precision}: {name} differs from the synchronous update"
            );
        }
    }
}
