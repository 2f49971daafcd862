#!/usr/bin/env python3
"""Record seqeval's entity scores for tricky and random tag sequences.

Writes tests/golden/seqeval/cases.json:
    {"seqeval": <version>, "cases": [{"name", "gold", "pred",
      "micro": {precision, recall, f1, support, predicted, correct},
      "per_type": {type: {...same...}}, "accuracy": float|null}]}
computed with seqeval's default (conlleval) mode. tests/metrics_seqeval.rs checks
src/eval/metrics.rs against every case to 1e-12.

Run by hand from the repository root:  python3 scripts/golden_seqeval.py
"""
import json
import os
import random
import warnings

import seqeval
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "seqeval", "cases.json")

# (name, gold sentences, predicted sentences)
TRICKY = [
    ("identical", [["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]]),
    ("i_after_o_starts_chunk", [["O", "I-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]]),
    ("i_at_sentence_start", [["I-LOC", "O"]], [["B-LOC", "O"]]),
    ("i_type_change_after_b", [["B-PER", "I-LOC", "O"]], [["B-PER", "B-LOC", "O"]]),
    ("i_type_change_after_i", [["B-PER", "I-PER", "I-LOC", "I-LOC"]], [["B-PER", "I-PER", "B-LOC", "I-LOC"]]),
    ("consecutive_b", [["B-PER", "B-PER", "B-PER"]], [["B-PER", "I-PER", "B-PER"]]),
    ("entity_at_sentence_end", [["O", "B-ORG", "I-ORG"], ["B-ORG"]], [["O", "B-ORG", "I-ORG"], ["O"]]),
    ("no_chunk_across_sentences", [["O", "B-X"], ["I-X", "O"]], [["O", "B-X"], ["B-X", "O"]]),
    ("all_o", [["O", "O"], ["O"]], [["O", "O"], ["O"]]),
    ("gold_all_o_pred_entities", [["O", "O", "O"]], [["B-A", "O", "I-B"]]),
    ("empty_predictions", [["B-A", "I-A", "O"], ["B-B"]], [["O", "O", "O"], ["O"]]),
    ("wrong_boundary", [["B-A", "I-A", "I-A"]], [["B-A", "I-A", "O"]]),
    ("wrong_type", [["B-A", "I-A"]], [["B-B", "I-B"]]),
    ("partial_types", [["B-A", "O", "B-B", "I-B", "O", "B-C"]], [["B-A", "O", "B-B", "O", "O", "B-D"]]),
    ("hyphenated_types", [["B-geo-loc", "I-geo-loc", "B-creative-work"]], [["B-geo-loc", "I-geo-loc", "I-creative-work"]]),
    ("single_token_sentences", [["B-A"], ["O"], ["I-A"]], [["B-A"], ["B-A"], ["I-A"]]),
    ("empty_sentence", [[], ["B-A"]], [[], ["B-A"]]),
    ("iobes_tags", [["S-A", "B-B", "E-B", "O"]], [["S-A", "B-B", "I-B", "E-B"]]),
    ("bare_prefixes", [["B", "I", "O", "B"]], [["B", "I", "I", "O"]]),
    ("unknown_bare_tag_at_start", [["X", "X", "O"], ["B-A"]], [["X", "O", "O"], ["B-A"]]),
    ("unicode_types", [["B-ä", "I-ä", "B-z"]], [["B-ä", "I-ä", "B-z"]]),
]

RANDOM_TAGS_BIO = ["O", "O", "O", "B-A", "I-A", "B-B", "I-B", "B-C-x", "I-C-x"]
RANDOM_TAGS_ODD = RANDOM_TAGS_BIO + ["E-A", "S-B", "I", "B", "X", ".-A", "X-B", "O-A"]


def random_cases(n, tags, seed, name):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        gold, pred = [], []
        for _ in range(rng.randint(1, 6)):
            length = rng.randint(0, 12)
            g = [rng.choice(tags) for _ in range(length)]
            # Predictions near the gold (so some chunks match), sometimes unrelated.
            p = [t if rng.random() < 0.7 else rng.choice(tags) for t in g]
            gold.append(g)
            pred.append(p)
        out.append((f"{name}_{k}", gold, pred))
    return out


def prf(p, r, f, support, predicted, correct):
    return {"precision": float(p), "recall": float(r), "f1": float(f),
            "support": int(support), "predicted": int(predicted), "correct": int(correct)}


def counts(gold, pred):
    """(correct, predicted, support) per type, as seqeval's extract_tp_actual_correct."""
    tg, tp = {}, {}
    for t, s, e in get_entities(gold):
        tg.setdefault(t, set()).add((s, e))
    for t, s, e in get_entities(pred):
        tp.setdefault(t, set()).add((s, e))
    return {t: (len(tg.get(t, set()) & tp.get(t, set())), len(tp.get(t, set())), len(tg.get(t, set())))
            for t in sorted(set(tg) | set(tp))}


def score(name, gold, pred):
    c = counts(gold, pred)
    total = [sum(v[i] for v in c.values()) for i in range(3)]
    micro = prf(precision_score(gold, pred), recall_score(gold, pred), f1_score(gold, pred),
                total[2], total[1], total[0])
    p, r, f, s = precision_recall_fscore_support(gold, pred, average=None)
    per_type = {t: prf(p[i], r[i], f[i], s[i], c[t][1], c[t][0]) for i, t in enumerate(sorted(c))}
    n_words = sum(len(g) for g in gold)
    acc = accuracy_score(gold, pred) if n_words else None
    return {"name": name, "gold": gold, "pred": pred, "micro": micro, "per_type": per_type, "accuracy": acc}


def main():
    warnings.simplefilter("ignore")  # zero-division and "not NE tag" warnings are expected
    cases = TRICKY + random_cases(220, RANDOM_TAGS_BIO, 1, "random_bio") + random_cases(80, RANDOM_TAGS_ODD, 2, "random_odd")
    doc = {"seqeval": seqeval.__version__ if hasattr(seqeval, "__version__") else "1.2.2",
           "cases": [score(*c) for c in cases]}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
        f.write("\n")
    print(f"{OUT}: {len(doc['cases'])} cases")


if __name__ == "__main__":
    main()
