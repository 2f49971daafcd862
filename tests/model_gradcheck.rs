//! Finite differences through the whole model: embeddings, every layer, the head, CE and
//! an extra loss on the final hidden states (where the contrastive term enters), with
//! dropout on (masks are a function of seed and step, so they are the same in every
//! evaluation of the loss).
mod common;
use common::{rel_l2, Rng};
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::backend::IGNORE_INDEX;
use deepcut_fast::model::{Dims, HostBatch, Mode, Model};

fn tiny_dims() -> Dims {
    Dims {
        vocab: 11,
        max_pos: 8,
        type_vocab: 2,
        hidden: 8,
        layers: 2,
        heads: 2,
        ffn: 12,
        labels: 3,
        eps: 1e-5,
        hidden_dropout: 0.2,
        attn_dropout: 0.2,
        classifier_dropout: 0.2,
    }
}

fn tiny_batch() -> HostBatch {
    let (b, t) = (2, 5);
    let lens = [5, 3];
    let mut batch = HostBatch {
        b,
        t,
        ..Default::default()
    };
    // two packed sequences, of 5 and 3 tokens
    batch.seqs.push(0);
    for (s, &len) in lens.iter().enumerate() {
        for i in 0..len {
            batch.input_ids.push((3 * s + 2 * i + 1) as i32 % 11);
            batch.position_ids.push(i as i32);
            batch.type_ids.push((i % 2) as i32);
            batch
                .labels
                .push(if i != 0 { ((s + i) % 3) as i32 } else { IGNORE_INDEX });
        }
        batch.seqs.push(batch.input_ids.len() as i32);
    }
    batch
}

#[test]
fn whole_model_matches_finite_differences() {
    let dims = tiny_dims();
    let mut rng = Rng(11);
    let mut model = Model::new(Cpu, dims.clone(), 16, |name, shape| {
        let n: usize = shape.iter().product();
        if name.ends_with("LayerNorm.weight") {
            (0..n).map(|_| 1.0 + 0.3 * rng.uniform()).collect()
        } else {
            rng.vec(n, 0.5)
        }
    });
    let batch = tiny_batch();
    let mode = Mode::Train { seed: 5, step: 3 };
    let n = batch.tokens();
    let r = Rng(12).vec(n * dims.hidden, 0.3);
    let count = batch.labelled() as f32;

    // L = mean CE + sum(r * hidden)
    let loss = |m: &mut Model<Cpu>| -> f64 {
        m.forward(&batch, mode);
        let ce = m.ce_loss(&batch) as f64;
        let h = m.hidden_host();
        ce + h.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
    };
    loss(&mut model);
    model.zero_grads();
    model.backward(1.0 / count, Some(&r));
    let grads = model.export_grads();

    let step = 1e-2f32;
    let mut pick = Rng(13);
    for (pi, (name, g)) in grads.iter().enumerate() {
        // a sample of each tensor (all of the small ones)
        let numel = g.len();
        let idx: Vec<usize> = if numel <= 24 {
            (0..numel).collect()
        } else {
            (0..24).map(|_| pick.below(numel)).collect()
        };
        let mut analytic = vec![];
        let mut numeric = vec![];
        for &i in &idx {
            let orig = model.params.iter()[pi].w[i];
            model.params.iter_mut()[pi].w[i] = orig + step;
            let up = loss(&mut model);
            model.params.iter_mut()[pi].w[i] = orig - step;
            let down = loss(&mut model);
            model.params.iter_mut()[pi].w[i] = orig;
            analytic.push(g[i]);
            numeric.push(((up - down) / (2.0 * step as f64)) as f32);
        }
        // Gradients that are zero in exact arithmetic (embedding rows of ids not in the
        // batch; the key bias, to which softmax is invariant) leave only fp32 noise.
        if numeric.iter().all(|&x| x.abs() < 1e-4) && analytic.iter().all(|&x| x.abs() < 1e-4) {
            continue;
        }
        let e = rel_l2(&analytic, &numeric);
        assert!(
            e < 5e-3,
            "{name}: relative error {e:.2e}\n analytic {analytic:?}\n numeric {numeric:?}"
        );
    }
}

#[test]
fn eval_mode_is_deterministic_and_train_mode_uses_dropout() {
    let dims = tiny_dims();
    let mut rng = Rng(21);
    let mut model = Model::new(Cpu, dims, 16, |_, shape| rng.vec(shape.iter().product(), 0.5));
    let batch = tiny_batch();
    model.forward(&batch, Mode::Eval);
    let a = model.logits_host();
    model.forward(&batch, Mode::Eval);
    assert_eq!(a, model.logits_host());
    model.forward(&batch, Mode::Train { seed: 1, step: 0 });
    let b = model.logits_host();
    model.forward(&batch, Mode::Train { seed: 1, step: 1 });
    let c = model.logits_host();
    assert_ne!(a, b);
    assert_ne!(b, c, "each step must draw new masks");
}
