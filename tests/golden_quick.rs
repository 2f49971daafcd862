mod common;
use common::golden::Golden;
use common::rel_l2;
use deepcut_fast::backend::cpu::Cpu;
use deepcut_fast::model::{Dims, HostBatch, Mode, Model};

fn run(dir: &str, prefix: &str) {
    let dir = common::repo().join("tests/golden").join(dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let dims = Dims {
        vocab: u("vocab_size"),
        max_pos: u("max_position_embeddings"),
        type_vocab: u("type_vocab_size"),
        hidden: u("hidden_size"),
        layers: u("num_hidden_layers"),
        heads: u("num_attention_heads"),
        ffn: u("intermediate_size"),
        labels: cfg["id2label"].as_object().unwrap().len(),
        eps: cfg["layer_norm_eps"].as_f64().unwrap() as f32,
        hidden_dropout: 0.0,
        attn_dropout: 0.0,
        classifier_dropout: 0.0,
    };
    let w = Golden::load(&dir.join("model.safetensors"));
    let g = Golden::load(&dir.join("golden.safetensors"));
    let sh = g.shape("input_ids").to_vec();
    let mut model = Model::new(Cpu, dims.clone(), sh[0] * sh[1], |name, _| {
        let full = if name.starts_with("classifier") {
            name.to_string()
        } else {
            format!("{prefix}{name}")
        };
        w.f(&full).to_vec()
    });
    let batch = HostBatch {
        b: sh[0],
        t: sh[1],
        input_ids: g.i("input_ids"),
        attention_mask: g.i("attention_mask").iter().map(|&x| x as f32).collect(),
        position_ids: g.i("position_ids"),
        type_ids: g.i("token_type_ids"),
        labels: g.i("labels"),
    };
    model.forward(&batch, Mode::Eval);
    println!("{dir:?} hidden {:.2e}", rel_l2(&model.hidden_host(), g.f("hidden")));
    println!("logits {:.2e}", rel_l2(&model.logits_host(), g.f("logits")));
    let loss = model.ce_loss(&batch);
    println!("loss {} vs {}", loss, g.f("loss")[0]);
    model.zero_grads();
    model.backward(1.0 / batch.labelled() as f32, None);
    for (name, gr) in model.export_grads() {
        let full = if name.starts_with("classifier") {
            name.clone()
        } else {
            format!("{prefix}{name}")
        };
        let e = rel_l2(&gr, g.f(&format!("grad.{full}")));
        if e > 1e-5 {
            println!("grad {name} {e:.2e}");
        }
    }
}

#[test]
fn quick() {
    run("tiny-bert", "bert.");
    run("tiny-roberta", "roberta.");
}
