#!/usr/bin/env python3
"""Golden reference values for deepcut-fast, computed with PyTorch + Hugging Face transformers.

Run from the repo root:   python3 scripts/golden.py            (everything, ~10 min, one CPU thread)
                          python3 scripts/golden.py bpe tiny   (a subset; steps below)
Requirements: scripts/requirements-golden.txt. Reads ../shared (SPEC.md sections 1-3,
data/, models/all-MiniLM-L6-v2); writes only tests/golden/. Every file is listed, with
its tensors, dtypes and shapes, in tests/golden/README.md.

Steps (in this order; later steps use the BPE tokenizer of the first):
  bpe      golden_bpe.py     tests/golden/bpe/                 byte-level BPE tokenizer (RoBERTa conventions)
  tiny     golden_tiny.py    tests/golden/tiny-{bert,roberta}/ tiny random models, forward + every gradient
  minilm   golden_minilm.py  tests/golden/minilm/              all-MiniLM-L6-v2 last_hidden_state
  head     golden_minilm.py  tests/golden/minilm-{wnut17,ncbi}/ head-only fine-tune, test logits + seqeval
  roberta  golden_roberta.py tests/golden/roberta-{wnut17,ncbi}/ small RoBERTa from scratch, logits + seqeval
Then always golden_manifest.py: tests/golden/MANIFEST.json (sizes, sha256, tensor dtypes/shapes).

Numerics: weights are float32 (saved as f32); every reference forward/backward runs on a
float64 copy (eager attention) and is stored as f32, so the golden is exact to f32
rounding. Determinism: seeded, torch.use_deterministic_algorithms(True), one CPU thread.
Reruns on the same machine and library versions are byte-identical; another CPU (other
SIMD kernels) can change the trained heads/models in the last bits, but every stored
golden is consistent with the weights stored next to it.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = ["bpe", "tiny", "minilm", "head", "roberta"]


def main(argv):
    steps = argv or STEPS
    for s in steps:
        if s not in STEPS:
            raise SystemExit(f"unknown step {s!r}; steps: {' '.join(STEPS)}")

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    import golden_common

    golden_common.setup_torch()
    os.makedirs(golden_common.GOLDEN, exist_ok=True)

    for s in STEPS:
        if s not in steps:
            continue
        t0 = time.time()
        print(f"== {s}", flush=True)
        if s == "bpe":
            import golden_bpe

            golden_bpe.main()
        elif s == "tiny":
            import golden_tiny

            golden_tiny.main()
        elif s == "minilm":
            import golden_minilm

            golden_minilm.hidden()
        elif s == "head":
            import golden_minilm

            golden_minilm.heads()
        elif s == "roberta":
            import golden_roberta

            golden_roberta.main()
        print(f"== {s} done in {time.time() - t0:.0f}s", flush=True)

    import golden_manifest

    golden_manifest.main()


if __name__ == "__main__":
    main(sys.argv[1:])
