"""Shared helpers for the golden-value scripts (see scripts/golden.py).

Paths, CoNLL reading, the SPEC section 1 label order, seeding, and the
word -> first-subword alignment used by every parity set.
"""

import json
import os
import random

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
if not os.path.isdir(SHARED):
    SHARED = "/work/shared"
DATA = os.path.join(SHARED, "data")
MINILM = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")

MAX_LEN = 128  # subwords per sentence, specials included (SPEC section 2)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch():
    """Deterministic CPU torch. One intra-op thread: reductions are ordered the same on every
    rerun, and a shared/oversubscribed machine does not slow it down 10x (measured)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def read_conll(path):
    """Returns a list of sentences, each a list of (word, tag). Words are kept byte-exact."""
    sents, cur = [], []
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            line = line.rstrip("\n")
            if line == "":
                if cur:
                    sents.append(cur)
                    cur = []
                continue
            word, tag = line.split("\t")
            cur.append((word, tag))
    if cur:
        sents.append(cur)
    return sents


def conll_path(dataset, split):
    return os.path.join(DATA, dataset, f"{split}.conll")


def label_list(train_sents):
    """SPEC section 1: every tag found in train, sorted, 'O' first."""
    tags = {t for s in train_sents for _, t in s}
    tags.discard("O")
    return ["O"] + sorted(tags)


def align(tokenizer, words, max_len=MAX_LEN):
    """Tokenise one pre-split sentence exactly as transformers does
    (is_split_into_words=True, special tokens added, no truncation).

    Returns (input_ids, first, n_missing):
      input_ids: list[int], specials included;
      first: list[int|None], per word the index in input_ids of its first subword
             (None when the word produced zero subwords);
      n_missing: number of words with zero subwords.
    """
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=False)
    ids = enc["input_ids"]
    first = [None] * len(words)
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and first[w] is None:
            first[w] = pos
    return ids, first, sum(f is None for f in first)


def write_json(path, obj, flat_keys=()):
    """Pretty JSON (indent 1, UTF-8). Top-level keys in flat_keys hold long lists: they are
    written one element per line, each element compact, to keep the file small."""
    if not flat_keys:
        text = json.dumps(obj, indent=1, ensure_ascii=False)
    else:
        parts = []
        for k, v in obj.items():
            key = json.dumps(k, ensure_ascii=False)
            if k in flat_keys:
                items = ",\n  ".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")) for x in v)
                parts.append(f" {key}: [\n  {items}\n ]")
            else:
                val = json.dumps(v, indent=1, ensure_ascii=False).replace("\n", "\n ")
                parts.append(f" {key}: {val}")
        text = "{\n" + ",\n".join(parts) + "\n}"
        assert json.loads(text) == obj
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
