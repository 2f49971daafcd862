"""Shared code for the predict/eval parity sets (items 4 and 5, see scripts/golden.py).

Alignment (SPEC section 2): each sentence is tokenised as transformers does for pre-split
words (tokenizer(words, is_split_into_words=True), special tokens added, no truncation,
no padding). A word's first subword is the first position p with word_ids()[p] == word;
its label (training) and its prediction (eval) live there. Other subwords and special
tokens get -100.

Parity set of a split: every sentence whose subword count including special tokens is
<= 128 AND in which every word has at least one subword. Logits are computed by a
float64 copy of the f32 model (eval mode, eager attention), batched with right padding.
"""

import copy
import os
from collections import defaultdict

import numpy as np
import torch
from safetensors.torch import save_file
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from golden_common import MAX_LEN, align, write_json


def encode_train(tokenizer, sents, label2id, max_len=MAX_LEN):
    """Training examples: ids truncated to max_len subwords (specials kept), labels on first subwords."""
    out = []
    for sent in sents:
        words = [w for w, _ in sent]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
        ids = enc["input_ids"]
        labels = [-100] * len(ids)
        seen = set()
        for pos, w in enumerate(enc.word_ids()):
            if w is not None and w not in seen:
                seen.add(w)
                labels[pos] = label2id[sent[w][1]]
        out.append((ids, labels))
    return out


def pad_batch(examples, pad_id):
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, (i, l) in enumerate(examples):
        ids[b, : len(i)] = torch.tensor(i)
        mask[b, : len(i)] = 1
        labels[b, : len(l)] = torch.tensor(l)
    return ids, mask, labels


def parity_set(tokenizer, sents, max_len=MAX_LEN):
    """Returns (included, too_long, zero_subword) where included is a list of
    (sentence_index, ids, first_positions)."""
    included, too_long, zero = [], [], []
    for si, sent in enumerate(sents):
        words = [w for w, _ in sent]
        ids, first, n_missing = align(tokenizer, words)
        if n_missing:
            for wi, f in enumerate(first):
                if f is None:
                    zero.append({
                        "sentence": si,
                        "word_index": wi,
                        "word": words[wi],
                        "codepoints": ["U+%04X" % ord(c) for c in words[wi]],
                    })
        if len(ids) > max_len:
            too_long.append({"sentence": si, "subwords": len(ids)})
        if n_missing or len(ids) > max_len:
            continue
        included.append((si, ids, first))
    return included, too_long, zero


@torch.no_grad()
def word_logits(model, included, pad_id, batch_size=64):
    """float64 forward on a copy of the model; per word the logits at its first subword.
    Returns float64 array [W, L] in file order."""
    m = copy.deepcopy(model).double().eval()
    order = sorted(range(len(included)), key=lambda k: len(included[k][1]))
    per_sent = [None] * len(included)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids, mask, _ = pad_batch([(included[k][1], []) for k in chunk], pad_id)
        logits = m(input_ids=ids, attention_mask=mask).logits  # [B,T,L] f64
        for b, k in enumerate(chunk):
            per_sent[k] = logits[b, included[k][2]].numpy()
    return np.concatenate(per_sent, axis=0)


def seqeval_numbers(y_true, y_pred):
    """seqeval default (conlleval) mode: micro P/R/F1 and per type, with entity counts."""
    rep = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    counts = defaultdict(lambda: {"true": 0, "pred": 0, "correct": 0})
    et, ep = set(get_entities(y_true)), set(get_entities(y_pred))
    for t, _, _ in et:
        counts[t]["true"] += 1
    for t, _, _ in ep:
        counts[t]["pred"] += 1
    for t, _, _ in et & ep:
        counts[t]["correct"] += 1
    per_type = {}
    for t in sorted(counts):
        r = rep.get(t, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
        per_type[t] = {
            "precision": float(r["precision"]),
            "recall": float(r["recall"]),
            "f1": float(r["f1-score"]),
            "support": int(r["support"]),
            **counts[t],
        }
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "n_true": len(et),
        "n_pred": len(ep),
        "n_correct": len(et & ep),
        "per_type": per_type,
    }


def predict_and_save(model, tokenizer, sents, out_dir, *, dataset, split, pad_id, save_logits=True):
    """Writes logits.safetensors (optional) and predictions.json; returns the metrics."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    L = len(id2label)
    included, too_long, zero = parity_set(tokenizer, sents)
    lg = word_logits(model, included, pad_id)  # [W, L] f64
    assert lg.shape[1] == L
    pred_ids = lg.argmax(axis=1)
    top2 = np.sort(lg, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    # the f32 argmax must equal the f64 one (else the golden would be ambiguous)
    lg32 = lg.astype(np.float32)
    assert (lg32.argmax(axis=1) == pred_ids).all()

    y_true, y_pred, off = [], [], 0
    for si, _, first in included:
        n = len(first)
        y_true.append([t for _, t in sents[si]])
        y_pred.append([id2label[int(i)] for i in pred_ids[off : off + n]])
        off += n
    assert off == lg.shape[0]
    metrics = seqeval_numbers(y_true, y_pred)

    sentence_index = torch.tensor([si for si, _, _ in included], dtype=torch.int64)
    logits_path = os.path.join(out_dir, "logits.safetensors")
    if not save_logits and os.path.exists(logits_path):
        os.remove(logits_path)
    if save_logits:
        save_file(
            {"logits": torch.from_numpy(lg32).contiguous(), "sentence_index": sentence_index},
            logits_path,
        )
    write_json(
        os.path.join(out_dir, "predictions.json"),
        {
            "dataset": dataset,
            "split": split,
            "max_len": MAX_LEN,
            "labels": [id2label[i] for i in range(L)],
            "n_sentences_in_split": len(sents),
            "n_sentences": len(included),
            "n_words": int(lg.shape[0]),
            "excluded_too_long": too_long,
            "excluded_zero_subword_words": zero,
            "min_top2_margin": float(margin.min()),
            "n_words_top2_margin_below_1e-4": int((margin < 1e-4).sum()),
            "seqeval": metrics,
            "sentence_index": sentence_index.tolist(),
            "predictions": y_pred,
        },
        flat_keys=("sentence_index", "predictions"),
    )
    print(
        f"  {dataset}/{split}: {len(included)}/{len(sents)} sentences, {lg.shape[0]} words; "
        f"excluded {len(too_long)} too long, {len({z['sentence'] for z in zero})} with zero-subword words; "
        f"P {metrics['precision']:.4f} R {metrics['recall']:.4f} F1 {metrics['f1']:.4f}; "
        f"min margin {margin.min():.2e}",
        flush=True,
    )
    return metrics
