#!/usr/bin/env python3
"""Record golden subword ids for pre-split words, as transformers computes them.

For each tokenizer, writes tests/golden/tokenize/<name>.json:
    {"tokenizer": <repo-relative path>, "transformers": <version>,
     "sentences": [{"source": "wnut17/train.conll:<line>", "words": [...],
                    "ids": [...], "word_ids": [null, 0, 0, 1, ..., null]}]}
where ids/word_ids are transformers' `tokenizer(words, is_split_into_words=True)`
(RoBERTa-style BPE loaded with add_prefix_space=True), with special tokens and
without truncation. tests/data_encode.rs checks the Rust encoder against these.

The sentences are real ones from wnut17 and ncbi_disease, picked by fixed rules
(URLs, emoji, accents, @mentions, #hashtags, very long words, invisible characters,
long sentences) plus a seeded random sample, and a few synthetic edge cases (a word
that is only a zero-width space, which WordPiece turns into no token at all).

Run by hand from the repository root:  python3 scripts/golden_tokenize.py
"""
import json
import os
import random
import re
import sys

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "tests", "golden", "tokenize")

TOKENIZERS = {
    # name: (repo-relative folder with tokenizer.json, from_pretrained kwargs)
    "minilm": ("../shared/models/all-MiniLM-L6-v2", {}),
    "bpe": ("tests/golden/bpe", {"add_prefix_space": True}),
}

# (rule name, predicate on the word list, how many sentences to take per file)
RULES = [
    ("url", lambda ws: any(re.match(r"https?://|www\.", w) for w in ws), 2),
    ("emoji", lambda ws: any(any(ord(c) >= 0x1F000 for c in w) for w in ws), 2),
    ("accent", lambda ws: any(any(0xC0 <= ord(c) <= 0x24F for c in w) for w in ws), 2),
    ("mention", lambda ws: any(w.startswith("@") and len(w) > 1 for w in ws), 2),
    ("hashtag", lambda ws: any(w.startswith("#") and len(w) > 1 for w in ws), 2),
    ("long_word", lambda ws: any(len(w) >= 40 for w in ws), 2),
    ("invisible", lambda ws: any(c in w for w in ws for c in "\u200b\ufeff"), 3),
    ("non_latin", lambda ws: any(any(ord(c) >= 0x370 and ord(c) < 0x1F000 for c in w) for w in ws), 2),
    ("greek_or_symbol", lambda ws: any(any(c in w for c in "αβγκ±°µ×") for w in ws), 2),
]

FILES = [
    "wnut17/train.conll",
    "wnut17/dev.conll",
    "wnut17/test.conll",
    "ncbi_disease/train.conll",
    "ncbi_disease/test.conll",
]

SYNTHETIC = [
    ["Hello", "\u200b", "world"],  # a word that WordPiece strips to nothing
    ["\u200b"],
    ["A", "B", "c"],
    ["<s>", "[CLS]", "<unk>", "[UNK]", "don't", "U.S.A.", "3.5%", "e-mail"],
    ["café", "naïve", "Zürich", "Ångström", "ﬁne", "Ⅻ", "１２３"],
    ["x" * 120, "y" * 30],  # WordPiece maps words over 100 chars to [UNK]
]


def read_conll(rel):
    """(first line number, words) per sentence; the files are in the uniform format."""
    out, words, start = [], [], None
    with open(os.path.join(DATA, rel), encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    out.append((start, words))
                words, start = [], None
                continue
            if start is None:
                start = i
            words.append(line.split("\t")[0])
    if words:
        out.append((start, words))
    return out


def pick_sentences():
    picked, seen = [], set()

    def take(rel, line, words):
        key = (rel, line)
        if key not in seen:
            seen.add(key)
            picked.append({"source": f"{rel}:{line}", "words": words})

    rng = random.Random(20240601)
    for rel in FILES:
        sents = read_conll(rel)
        for _name, pred, k in RULES:
            for line, words in [s for s in sents if pred(s[1])][:k]:
                take(rel, line, words)
        longest = max(sents, key=lambda s: len(s[1]))
        take(rel, *longest)
        for line, words in rng.sample(sents, 2):
            take(rel, line, words)
    # wnut16 test has a word that starts with a zero-width space.
    for line, words in read_conll("wnut16/test.conll"):
        if any(w.startswith("\u200b") for w in words):
            take("wnut16/test.conll", line, words)
            break
    for i, words in enumerate(SYNTHETIC):
        picked.append({"source": f"synthetic:{i}", "words": words})
    return picked


def main():
    sentences = pick_sentences()
    os.makedirs(OUT, exist_ok=True)
    for name, (folder, kwargs) in TOKENIZERS.items():
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, folder), **kwargs)
        if not tok.is_fast:
            sys.exit(f"{name}: expected a fast tokenizer")
        rows = []
        for s in sentences:
            enc = tok(s["words"], is_split_into_words=True, truncation=False)
            rows.append({**s, "ids": enc["input_ids"], "word_ids": enc.word_ids()})
        doc = {
            "tokenizer": os.path.join(folder, "tokenizer.json"),
            "transformers": transformers.__version__,
            "tokenizer_class": type(tok).__name__,
            "sentences": rows,
        }
        path = os.path.join(OUT, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=0)
            f.write("\n")
        n_tok = sum(len(r["ids"]) for r in rows)
        print(f"{path}: {len(rows)} sentences, {n_tok} tokens ({type(tok).__name__})")


if __name__ == "__main__":
    main()
