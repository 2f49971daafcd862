//! The CPU encoder against Hugging Face transformers (golden values written by
//! scripts/golden.py, computed in float64 from float32 weights): logits, loss, final
//! hidden states and the gradient of every parameter of tiny random BERT and RoBERTa
//! token classifiers on a padded batch of unequal lengths; and the real all-MiniLM-L6-v2
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

fn batch_of(g: &Golden, with_labels: bool) -> HostBatch {
    let shape = g.shape("input_ids").to_vec();
    let (b, t) = (shape[0], shape[1]);
    let ids = g.i("input_ids");
    HostBatch {
        b,
        t,
        attention_mask: g.i("attention_mask").iter().map(|&x| x as f32).collect(),
        position_ids: if g.i64s.contains_key("position_ids") {
            g.i("position_ids")
        } else {
            (0..b * t).map(|i| (i % t) as i32).collect()
        },
        type_ids: vec![0; b * t],
        labels: if with_labels { g.i("labels") } else { vec![-100; b * t] },
        input_ids: ids,
    }
}

fn tiny_model_matches(dir: &Path, prefix: &str) {
    let (cfg, w, has_head) = load_model_dir(dir).unwrap();
    assert!(has_head);
    let labels = cfg.id2label.as_ref().unwrap().len();
    let g = Golden::load(&dir.join("golden.safetensors"));
    let batch = batch_of(&g, true);
    let mut model = build(&cfg, &w, labels, batch.tokens());
    model.forward(&batch, Mode::Eval);

    let e = rel_l2(&model.hidden_host(), g.f("hidden"));
    assert!(e < 1e-5, "{}: hidden rel err {e:.2e}", dir.display());
    let e = rel_l2(&model.logits_host(), g.f("logits"));
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
    let batch = batch_of(&g, false);
    let mut model = build(&cfg, &w, 0, batch.tokens());
    model.forward(&batch, Mode::Eval);
    let e = rel_l2(&model.hidden_host(), g.f("last_hidden_state"));
    assert!(e < 1e-5, "MiniLM hidden rel err {e:.2e}");
}
