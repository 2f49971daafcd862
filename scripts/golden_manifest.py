"""Writes tests/golden/MANIFEST.json: every file golden.py writes under tests/golden with its size and
sha256, and for .safetensors files every tensor's dtype and shape. Run last by golden.py."""

import hashlib
import os

from safetensors import safe_open

from golden_common import GOLDEN, write_json

# the folders golden.py writes (tests/golden/seqeval and tokenize come from other scripts)
FOLDERS = ["bpe", "tiny-bert", "tiny-roberta", "minilm", "minilm-wnut17", "minilm-ncbi", "roberta-wnut17",
           "roberta-ncbi"]


def tensors(path):
    out = {}
    with safe_open(path, "pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            out[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
    return out


def main():
    files = {}
    total = 0
    for folder in FOLDERS:
        for n in sorted(os.listdir(os.path.join(GOLDEN, folder))):
            p = os.path.join(GOLDEN, folder, n)
            rel = f"{folder}/{n}"
            with open(p, "rb") as f:
                data = f.read()
            entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if n.endswith(".safetensors"):
                entry["tensors"] = tensors(p)
            files[rel] = entry
            total += len(data)
    files = dict(sorted(files.items()))
    write_json(os.path.join(GOLDEN, "MANIFEST.json"), {"total_bytes": total, "files": files})
    print(f"manifest: {len(files)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
