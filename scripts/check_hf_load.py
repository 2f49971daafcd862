#!/usr/bin/env python3
"""Check that transformers loads model folders written by deepcut-fast.

Usage: check_hf_load.py DIR [DIR ...]

For each DIR, loads it with AutoModelForTokenClassification.from_pretrained(...,
output_loading_info=True) and fails (exit 1) if transformers reports missing,
unexpected or mismatched keys or error messages. It then checks what the loading
info cannot show: every tensor in model.safetensors arrived unchanged in the model
(not silently re-initialised), the parameters are float32, the head size matches
config.num_labels, and a forward pass gives finite logits.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification


def check(model_dir):
    problems = []
    model, info = AutoModelForTokenClassification.from_pretrained(model_dir, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(key):
            problems.append(f"{key}: {sorted(map(str, info[key]))}")

    state = model.state_dict()
    saved = load_file(f"{model_dir}/model.safetensors")
    absent = sorted(n for n in saved if n not in state)
    changed = sorted(n for n in saved if n in state and not torch.equal(state[n].cpu(), saved[n]))
    for what, names in (("are not model parameters", absent), ("differ from the file after loading", changed)):
        if names:
            problems.append(f"{len(names)} tensors of the file {what}: {names[:5]}{' ...' if len(names) > 5 else ''}")

    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        problems.append(f"parameter dtypes {dtypes}, expected float32 only")
    if model.classifier.out_features != model.config.num_labels:
        problems.append(f"classifier has {model.classifier.out_features} outputs, config.num_labels is {model.config.num_labels}")

    model.eval()
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([[pad + 1, pad + 2, pad + 3, pad]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if not torch.isfinite(logits).all():
        problems.append("forward pass gave non-finite logits")

    name = type(model).__name__
    if problems:
        print(f"FAIL {model_dir} ({name}):")
        for p in problems:
            print(f"  {p}")
        return False
    print(f"OK {model_dir}: {name}, {len(saved)} tensors, {model.config.num_labels} labels, "
          f"logits {tuple(logits.shape)}")
    return True


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    results = [check(d) for d in sys.argv[1:]]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
