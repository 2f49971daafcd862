"""Items 3 and 4: the real all-MiniLM-L6-v2 checkpoint.

Item 3, tests/golden/minilm/:
  hidden.safetensors: input_ids [4,T] i64, attention_mask [4,T] i64, token_type_ids [4,T] i64 (zeros),
                      last_hidden_state [4,T,384] f32 (BertModel, eval, float64 reference)
  sentences.json:     the 4 pre-split sentences (tokenised with is_split_into_words=True)

Item 4, tests/golden/minilm-wnut17/ and tests/golden/minilm-ncbi/:
  BertForTokenClassification.from_pretrained(all-MiniLM-L6-v2) with the dataset's label set
  (SPEC section 1), classifier head only trained on train (encoder frozen, AdamW
  lr 1e-3, batch 32 sentences, seed 0, sentences truncated to 128 subwords) for HEAD_EPOCHS=50
  epochs on cached eval-mode encoder outputs (1 epoch as first asked gave test F1 0.05,
  precision 0.03: not meaningful).
  head.safetensors: classifier.weight [L,384] f32, classifier.bias [L] f32
  config.json:      model.config as save_pretrained writes it (id2label/label2id)
  predictions.json (both) and logits.safetensors (wnut17 only): see golden_predict.py and
  tests/golden/README.md
"""

import copy
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from golden_common import GOLDEN, MINILM, conll_path, label_list, read_conll, seed_all, write_json
from golden_predict import encode_train, pad_batch, predict_and_save

SENTENCES = [
    ["Empire", "State", "Building", "=", "ESB", "."],
    ["I", "'m", "living", "in", "Nebraska", "for", "two", "weeks", ",", "lol", "#travel", "@paulwalk"],
    ["Adenomatous", "polyposis", "coli"],
    ["Hello", "world", "!", "Ünïcödé", "naïve", "café"],
]


def load_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    assert tok.pad_token_id == 0 and tok.cls_token_id == 101 and tok.sep_token_id == 102
    return tok


def hidden():
    from transformers import BertModel

    out = os.path.join(GOLDEN, "minilm")
    os.makedirs(out, exist_ok=True)
    tok = load_tokenizer()
    enc = tok(SENTENCES, is_split_into_words=True, padding=True, truncation=False, return_tensors="pt")
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    tt = torch.zeros_like(ids)
    model = BertModel.from_pretrained(MINILM, attn_implementation="eager").eval()
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        h = m64(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state.float().contiguous()
        h32 = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    rel = float((h32 - h).norm() / h.norm())
    assert rel < 1e-5, rel
    save_file(
        {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(), "token_type_ids": tt, "last_hidden_state": h},
        os.path.join(out, "hidden.safetensors"),
    )
    write_json(
        os.path.join(out, "sentences.json"),
        {"sentences": SENTENCES, "n_subwords": mask.sum(1).tolist()},
    )
    print(f"minilm hidden: shape {list(h.shape)}, lengths {mask.sum(1).tolist()}, f32-vs-f64 rel err {rel:.2e}")


HEAD_EPOCHS = 50


@torch.no_grad()
def first_subword_features(bert, examples, pad_id, batch_size=64):
    """Per sentence: (final hidden state at its labelled positions [n,384] f32, labels [n])."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    per = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids, mask, lab = pad_batch([examples[i] for i in chunk], pad_id)
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        for b, i in enumerate(chunk):
            sel = lab[b] != -100
            per[i] = (h[b][sel].clone(), lab[b][sel].clone())
    return per


def train_head(model, examples, pad_id, *, epochs, lr, batch_size, seed, log):
    """Trains model.classifier only. The encoder is frozen and run once in eval mode (no
    dropout), so the head trains on cached final hidden states at the labelled positions:
    batches of `batch_size` sentences (order reshuffled every epoch by torch.Generator(seed)),
    loss = mean CE over the batch's labelled tokens (what BertForTokenClassification computes
    in eval mode), AdamW with torch defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01)."""
    model.eval()
    per = first_subword_features(model.bert, examples, pad_id)
    head = model.classifier
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        order = torch.randperm(len(per), generator=gen).tolist()
        tot, n = 0.0, 0
        for s in range(0, len(order), batch_size):
            x = torch.cat([per[i][0] for i in order[s : s + batch_size]])
            y = torch.cat([per[i][1] for i in order[s : s + batch_size]])
            loss = torch.nn.functional.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
            n += 1
        if ep == 0 or ep + 1 == epochs or (ep + 1) % 5 == 0:
            print(f"  {log} epoch {ep + 1}/{epochs}: mean train loss {tot / n:.4f}", flush=True)


def head(dataset, out_name, save_logits=True):
    from transformers import BertForTokenClassification

    out = os.path.join(GOLDEN, out_name)
    os.makedirs(out, exist_ok=True)
    tok = load_tokenizer()
    train_sents = read_conll(conll_path(dataset, "train"))
    labels = label_list(train_sents)
    id2label = {i: l for i, l in enumerate(labels)}
    label2id = {l: i for i, l in enumerate(labels)}
    seed_all(0)
    model = BertForTokenClassification.from_pretrained(
        MINILM, num_labels=len(labels), id2label=id2label, label2id=label2id, attn_implementation="eager"
    )
    # the encoder must come from the checkpoint (no `bert.` prefix there): compare one tensor
    with safe_open(os.path.join(MINILM, "model.safetensors"), "pt") as f:
        for k in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.LayerNorm.bias"):
            assert torch.equal(f.get_tensor(k), model.bert.get_parameter(k)), k
    examples = encode_train(tok, train_sents, label2id)
    train_head(model, examples, tok.pad_token_id, epochs=HEAD_EPOCHS, lr=1e-3, batch_size=32, seed=0, log=out_name)
    save_file(
        {
            "classifier.weight": model.classifier.weight.detach().float().contiguous(),
            "classifier.bias": model.classifier.bias.detach().float().contiguous(),
        },
        os.path.join(out, "head.safetensors"),
    )
    model.config.architectures = ["BertForTokenClassification"]
    model.config.save_pretrained(out)
    test = read_conll(conll_path(dataset, "test"))
    return predict_and_save(
        model, tok, test, out, dataset=dataset, split="test", pad_id=tok.pad_token_id, save_logits=save_logits
    )


def heads():
    head("wnut17", "minilm-wnut17")
    # ncbi: predictions.json + seqeval only (logits left out to keep tests/golden small)
    head("ncbi_disease", "minilm-ncbi", save_logits=False)


def main():
    hidden()
    heads()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
