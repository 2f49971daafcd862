"""Item 1: a small byte-level BPE tokenizer with RoBERTa conventions.

Output: tests/golden/bpe/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}

Trained with the `tokenizers` library on the words of wnut17/train.conll and
ncbi_disease/train.conll (each word fed on its own, so the ByteLevel pre-tokenizer with
add_prefix_space=True sees it as " word", exactly as at encode time), vocab size 2000.
Special tokens: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4; the 256 byte symbols come
next, then merges. RoBERTa post-processor (<s> ... </s>), ByteLevel pre-tokenizer and
decoder, no normaliser.

Checked here (the script fails otherwise), over every word of wnut17 and ncbi_disease
(all splits): the ids transformers.AutoTokenizer (RobertaTokenizer, add_prefix_space=True,
is_split_into_words=True) gives equal
  (a) tokenizers.Tokenizer.from_file(tokenizer.json).encode(words, is_pretokenized=True)
  (b) [0] + concat(encode(" " + word, add_special_tokens=False)) + [2]   (SPEC section 2)
"""

import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from golden_common import GOLDEN, conll_path, read_conll, write_json

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
VOCAB_SIZE = 2000
OUT = os.path.join(GOLDEN, "bpe")


def train_words():
    words = []
    for ds in ("wnut17", "ncbi_disease"):
        for sent in read_conll(conll_path(ds, "train")):
            words.extend(w for w, _ in sent)
    return words


def build():
    tok = Tokenizer(models.BPE(dropout=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_words(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True, add_prefix_space=True
    )
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_files(out_dir, model_max_length):
    """tokenizer_config.json + special_tokens_map.json for RobertaTokenizer(Fast)."""
    write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "RobertaTokenizer",
            "add_prefix_space": True,
            "trim_offsets": True,
            "errors": "replace",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
        },
    )
    write_json(
        os.path.join(out_dir, "special_tokens_map.json"),
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
        },
    )


def copy_tokenizer(dst_dir, model_max_length):
    """Copy the BPE tokenizer into a model folder (tokenizer.json byte-identical)."""
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copyfile(os.path.join(OUT, "tokenizer.json"), os.path.join(dst_dir, "tokenizer.json"))
    tokenizer_files(dst_dir, model_max_length)


def load_hf(path=OUT):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, add_prefix_space=True)


def verify():
    from transformers import RobertaTokenizerFast

    raw = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    hf = load_hf()
    assert isinstance(hf, RobertaTokenizerFast), type(hf)
    assert (hf.cls_token_id, hf.pad_token_id, hf.sep_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert len(hf) == raw.get_vocab_size(), (len(hf), raw.get_vocab_size())
    n_sent = 0
    cache = {}
    for ds in ("wnut17", "ncbi_disease"):
        for split in ("train", "dev", "test"):
            for sent in read_conll(conll_path(ds, split)):
                words = [w for w, _ in sent]
                a = hf(words, is_split_into_words=True)["input_ids"]
                b = raw.encode(words, is_pretokenized=True).ids
                c = [0]
                for w in words:
                    if w not in cache:
                        cache[w] = raw.encode(" " + w, add_special_tokens=False).ids
                    assert len(cache[w]) > 0, w
                    c.extend(cache[w])
                c.append(2)
                assert a == b == c, (ds, split, words)
                n_sent += 1
    return n_sent, len(cache)


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build()
    tok.save(os.path.join(OUT, "tokenizer.json"), pretty=False)
    tokenizer_files(OUT, 512)
    n_sent, n_words = verify()
    print(f"bpe: vocab {tok.get_vocab_size()}, verified on {n_sent} sentences / {n_words} distinct words")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
