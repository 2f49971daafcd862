"""Item 5: small RoBERTa token classifiers trained from random init with the BPE of item 1.

Outputs, for (dataset, folder) in (wnut17, roberta-wnut17), (ncbi_disease, roberta-ncbi):
  tests/golden/<folder>/config.json, model.safetensors (f32), tokenizer.json,
      tokenizer_config.json, special_tokens_map.json   (loads with from_pretrained)
  tests/golden/<folder>/predictions.json, and logits.safetensors for wnut17 only (size)

Model: RobertaForTokenClassification, 2 layers, hidden 64, 4 heads, intermediate 128,
max_position_embeddings 132 (positions 2..129 for 128 subwords), type_vocab_size 1,
pad 1, vocab = BPE size (2000), dropout 0.1, initializer_range 0.02, seed 0.
Training: EPOCHS epochs on train (sentences truncated to 128 subwords), batch 32
sentences, AdamW lr 1e-3 (torch defaults otherwise), linear warm-up over the first 5% of
steps then linear decay to 0, train mode (dropout on), deterministic CPU torch.
"""

import os

import torch

import golden_bpe
from golden_common import GOLDEN, conll_path, label_list, read_conll, seed_all
from golden_predict import encode_train, pad_batch, predict_and_save

EPOCHS = {"wnut17": 20, "ncbi_disease": 8}
LR = 1e-3
BATCH = 32


def train_full(model, examples, pad_id, *, epochs, lr, batch_size, seed, log):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        tot, n = 0.0, 0
        for s in range(0, len(order), batch_size):
            ids, mask, labels = pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            n += 1
        if ep == 0 or ep + 1 == epochs or (ep + 1) % 5 == 0:
            print(f"  {log} epoch {ep + 1}/{epochs}: mean train loss {tot / n:.4f}", flush=True)
    model.eval()


def run(dataset, out_name, save_logits=True):
    from transformers import AutoModelForTokenClassification, RobertaConfig, RobertaForTokenClassification

    out = os.path.join(GOLDEN, out_name)
    golden_bpe.copy_tokenizer(out, model_max_length=130)
    tok = golden_bpe.load_hf(out)
    train_sents = read_conll(conll_path(dataset, "train"))
    labels = label_list(train_sents)
    seed_all(0)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=132,
        type_vocab_size=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        num_labels=len(labels),
        id2label={i: l for i, l in enumerate(labels)},
        label2id={l: i for i, l in enumerate(labels)},
    )
    cfg._attn_implementation = "eager"
    model = RobertaForTokenClassification(cfg).float()
    examples = encode_train(tok, train_sents, cfg.label2id)
    train_full(model, examples, tok.pad_token_id, epochs=EPOCHS[dataset], lr=LR, batch_size=BATCH, seed=0,
               log=out_name)
    model.save_pretrained(out)
    # what was saved is what we evaluate
    model = AutoModelForTokenClassification.from_pretrained(out, attn_implementation="eager").eval()
    test = read_conll(conll_path(dataset, "test"))
    return predict_and_save(
        model, tok, test, out, dataset=dataset, split="test", pad_id=tok.pad_token_id, save_logits=save_logits
    )


def main():
    run("wnut17", "roberta-wnut17")
    run("ncbi_disease", "roberta-ncbi", save_logits=False)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
