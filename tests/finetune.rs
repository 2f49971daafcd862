//! The fine-tuning loop (`train`, `run`'s retrain baseline, SISA's shards) reads each step's
//! loss and update stats a step late (src/train/readback.rs), so the device never waits for
//! the host inside a step (issue #6). It must still train exactly as the plain synchronous
//! loop written out here: forward, backward, read the loss, `Optimizer::update`.
mod common;
use common::fixture;
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::backend::Precision;
use deepcut_fast::data::{bucketed_batches, Batch};
use deepcut_fast::eval::evaluate::Dataset;
use deepcut_fast::infer::model_from_weights;
use deepcut_fast::model::Mode;
use deepcut_fast::train::finetune::{finetune, Base, FinetuneConfig};
use deepcut_fast::train::optim::{LossScaling, OptimConfig, Optimizer};

/// One epoch of 8 batches (48 sentences bucketed by length, at most 8 a batch) with a
/// checkpoint every 3 steps: steps 1, 2, 4, 5 and 7 are read a step late, 3 and 6 (the
/// checkpoints) and 8 (the epoch's end) at once. Every step's loss and the
/// final weights are the synchronous loop's, bit for bit, in fp32, bf16 and fp16 (every
/// update decided on the backend), and in fp16 from a loss scale of 2^24 with growth every
/// 2 steps, which overflows: a step enqueued before the overflow of the one before it was
/// known runs again at the halved scale, and the skips and the scaler's history are the
/// synchronous loop's too.
#[test]
fn pipelined_fine_tuning_equals_the_synchronous_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture::build(tmp.path());
    let base = Base::load(&fx.base).unwrap();
    let data = Dataset::load(&fx.data).unwrap();
    let overflowing = LossScaling {
        init: 2f32.powi(24),
        growth_interval: 2,
    };
    let cases = [
        (Precision::Fp32, None),
        (Precision::Bf16, None),
        (Precision::Fp16, None),
        (Precision::Fp16, Some(overflowing)),
    ];
    for (k, (precision, scaling)) in cases.into_iter().enumerate() {
        let clf = base.classifier(&fx.labels, 3).unwrap();
        let mut fc = FinetuneConfig {
            epochs: 1,
            lr: 2e-3,
            batch: 8,
            max_len: 32,
            checkpoint_every: 3,
            precision,
            ..FinetuneConfig::default()
        };
        if let Some(ls) = scaling {
            fc.loss_scaling = ls;
        }
        let out = tmp.path().join(format!("out-{k}-{precision}"));
        let start = base.classifier(&fx.labels, 3).unwrap(); // the same head: same seed
        let (got, rec) = finetune(Cpu, start, &fx.base, &fx.train, &data, &fc, &out, false, true).unwrap();

        let windows = clf
            .encoder
            .encode_sentences(&fx.train, Some(&clf.labels), fc.max_len)
            .unwrap();
        let lengths: Vec<usize> = windows.iter().map(|w| w.ids.len()).collect();
        let style = clf.position_style();
        let batches = bucketed_batches(&lengths, fc.batch, fc.seed, 0);
        assert_eq!(
            batches.len(),
            8,
            "the test's premise: 48 sentences bucketed into 8 batches"
        );
        let total = batches.len() as u64;
        let mut model = model_from_weights(Cpu, &clf.cfg, &clf.weights, clf.labels.len(), fc.batch * fc.max_len)
            .with_precision(precision);
        let mut opt = Optimizer::new(
            &model,
            OptimConfig {
                lr: fc.lr,
                weight_decay: fc.weight_decay,
                warmup: (total as f32 * fc.warmup_ratio).round() as u64,
                total,
                clip: fc.clip,
            },
        )
        .with_precision(precision, fc.loss_scaling);
        let mut losses = vec![];
        for (i, rows) in batches.iter().enumerate() {
            let batch = Batch::gather(&windows, rows, style);
            model.forward(
                &batch.inputs,
                Mode::Train {
                    seed: fc.seed,
                    step: i as u64,
                },
            );
            model.zero_grads();
            model.backward(opt.loss_scale() / batch.labelled().max(1) as f32, None);
            losses.push(model.ce_loss(&batch.inputs));
            opt.update(&mut model).unwrap();
        }
        assert_eq!(rec.step_losses.len(), losses.len(), "{precision}: steps recorded");
        for (s, (a, b)) in rec.step_losses.iter().zip(&losses).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{precision} step {}: loss {a} vs {b}", s + 1);
        }
        assert!(losses[7] < losses[0], "{precision}: it trained ({losses:?})");
        assert_eq!(rec.loss_scaler, opt.scaler, "{precision}: loss scaler");
        if scaling.is_some() {
            let sc = opt.scaler.as_ref().unwrap();
            assert!(sc.skipped_steps >= 1, "2^24 must overflow: {sc:?}");
            assert!(sc.skipped_steps < 8, "and steps must apply: {sc:?}");
        }
        let want = model.to_host();
        for (name, t) in &got.weights.tensors {
            let w = &want.tensors[name];
            assert!(
                t.data.iter().zip(&w.data).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{precision}: {name} differs from the synchronous loop's"
            );
        }
    }
}
