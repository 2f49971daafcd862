//! The CPU encoder against Hugging Face transformers (golden values written by
//! scripts/golden.py, computed in float64 from float32 weights): logits, loss, final
//! hidden states and the gradient of every parameter of tiny random BERT and RoBERTa
//! token classifiers on a batch of unequal lengths (padded there, packed here); and the real all-MiniLM-L6-v2
//! on a few sentences. Tolerances (relative L2 over whole tensors): 1e-5 forward, 1e-4
//! gradients (the contract).
mod common;
use common::golden::Golden;
use common::{max_abs_diff, rel_l2};
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::model::{load_model_dir, Dims, HostBatch, HostWeights, Mode, Model, ModelConfig};
use std::path::Path;

fn build(cfg: &ModelConfig, w: &HostWeights, labels: usize, max_tokens: usize) -> Model<Cpu> {
    Model::new(Cpu, Dims::from_config(cfg, labels), max_tokens, |name, _| {
        w.get(name)
            .unwrap_or_else(|| panic!("weights lack {name}"))
            .data
            .clone()
    })
}

/// The golden batch (transformers' padded [b, t] with its attention mask), packed as the
/// engine runs it, and the padded positions of its real tokens, in packed order: the rows
/// of transformers' per-token outputs to compare with (its padding rows are not outputs).
fn batch_of(g: &Golden, with_labels: bool) -> (HostBatch, Vec<usize>) {
    let shape = g.shape("input_ids").to_vec();
    let (b, t) = (shape[0], shape[1]);
    let mask = g.i("attention_mask");
    let ids = g.i("input_ids");
    let pos = if g.i64s.contains_key("position_ids") {
        g.i("position_ids")
    } else {
        (0..b * t).map(|i| (i % t) as i32).collect()
    };
    let labels = if with_labels { g.i("labels") } else { vec![-100; b * t] };
    let mut batch = HostBatch {
        b,
        t,
        seqs: vec![0],
        ..Default::default()
    };
    let mut real = vec![];
    for r in 0..b {
        let len = mask[r * t..(r + 1) * t].iter().filter(|&&m| m == 1).count();
        assert!(
            mask[r * t..r * t + len].iter().all(|&m| m == 1),
            "row {r}: padding only at the end"
        );
        for i in r * t..r * t + len {
            real.push(i);
            batch.input_ids.push(ids[i]);
            batch.position_ids.push(pos[i]);
            batch.type_ids.push(0);
            batch.labels.push(labels[i]);
        }
        batch.seqs.push(real.len() as i32);
    }
    assert!(real.len() < b * t, "the golden batch has padding to leave out");
    (batch, real)
}

/// Rows `real` (width w) of a padded golden tensor.
fn rows(x: &[f32], real: &[usize], w: usize) -> Vec<f32> {
    real.iter()
        .flat_map(|&i| x[i * w..(i + 1) * w].iter().copied())
        .collect()
}

fn tiny_model_matches(dir: &Path, prefix: &str) {
    let (cfg, w, has_head) = load_model_dir(dir).unwrap();
    assert!(has_head);
    let labels = cfg.id2label.as_ref().unwrap().len();
    let g = Golden::load(&dir.join("golden.safetensors"));
    let (batch, real) = batch_of(&g, true);
    let mut model = build(&cfg, &w, labels, batch.tokens());
    model.forward(&batch, Mode::Eval);

    let e = rel_l2(&model.hidden_host(), &rows(g.f("hidden"), &real, model.dims.hidden));
    assert!(e < 1e-5, "{}: hidden rel err {e:.2e}", dir.display());
    let e = rel_l2(&model.logits_host(), &rows(g.f("logits"), &real, labels));
    assert!(e < 1e-5, "{}: logits rel err {e:.2e}", dir.display());
    let loss = model.ce_loss(&batch);
    let want = g.f("loss")[0];
    assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs {want}");

    model.zero_grads();
    model.backward(1.0 / batch.labelled() as f32, None);
    let grads = model.export_grads();
    let scale = grads
        .iter()
        .map(|(_, v)| v.iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(0f32, f32::max);
    for (name, got) in &grads {
        let full = if name.starts_with("classifier") {
            name.clone()
        } else {
            format!("{prefix}{name}")
        };
        let want = g.f(&format!("grad.{full}"));
        let want_norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        if want_norm < 1e-6 * scale {
            // Zero in exact arithmetic (the key bias: softmax ignores a per-row shift);
            // a relative error of two roundoff residues is meaningless, so bound the
            // absolute error against the size of the other gradients instead.
            let d = max_abs_diff(got, want);
            assert!(d < 1e-6 * scale, "{name}: zero gradient expected, max abs {d:.2e}");
            continue;
        }
        let e = rel_l2(got, want);
        assert!(e < 1e-4, "{}: grad {name} rel err {e:.2e}", dir.display());
    }
    assert_eq!(
        grads.len(),
        g.f32s.keys().filter(|k| k.starts_with("grad.")).count(),
        "every parameter has a golden gradient"
    );
}

#[test]
fn tiny_bert_forward_and_gradients_match_transformers() {
    tiny_model_matches(&common::repo().join("tests/golden/tiny-bert"), "bert.");
}

#[test]
fn tiny_roberta_forward_and_gradients_match_transformers() {
    tiny_model_matches(&common::repo().join("tests/golden/tiny-roberta"), "roberta.");
}

#[test]
fn minilm_hidden_states_match_transformers() {
    let (cfg, w, has_head) = load_model_dir(&common::shared().join("models/all-MiniLM-L6-v2")).unwrap();
    assert!(!has_head);
    let g = Golden::load(&common::repo().join("tests/golden/minilm/hidden.safetensors"));
    let (batch, real) = batch_of(&g, false);
    let mut model = build(&cfg, &w, 0, batch.tokens());
    model.forward(&batch, Mode::Eval);
    let e = rel_l2(
        &model.hidden_host(),
        &rows(g.f("last_hidden_state"), &real, model.dims.hidden),
    );
    assert!(e < 1e-5, "MiniLM hidden rel err {e:.2e}");
}
