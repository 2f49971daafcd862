#!/usr/bin/env python3
"""One DeepCUT training step (SPEC section 4) in PyTorch next to `deepcut-fast bench`, at
the same shapes on the same device: median step time, tokens/s and their ratio.

The PyTorch step: a transformers BertForTokenClassification / RobertaForTokenClassification
built from the same config (the bench prints it as `model_config`; random init),
attn_implementation="sdpa", train mode. Per step: one forward over
[forget | forget | retain] (the two forget copies get independent dropout masks, the two
views), CE over the labelled retain tokens, the final hidden states of every labelled
token L2-normalised, class-masked InfoNCE with the forget tokens as anchors
(scripts/infonce_torch.py: same-class denominator, own view negative, detached columns,
tau 0.1), loss = CE + 0.3 L_f, backward, clipping at global norm 1.0, AdamW (0.9/0.999,
eps 1e-8, weight decay 0.01, none on biases and LayerNorm), linear schedule. The model in
the engine's --precision (default bf16 on CUDA, fp32 on the CPU): bf16 autocast (CUDA or
CPU), fp16 autocast (CUDA), else fp32; the loss in fp32 (SPEC section 7).

Synthetic data as the bench's: --seq-len real tokens per sequence (no padding), ids
uniform over the vocabulary, first and last position unlabelled, others 'O' (class 0)
with probability 0.8, else uniform over the other classes.

The bench runs first (it reports the shapes), then PyTorch, one after the other on the
same cores; the load average is printed next to each.

Usage:
  python3 scripts/compare-torch.py [--preset minilm-l6] [--bf 8] [--br 32] [--seq-len 128]
      [--steps 10] [--warmup 2] [--device cpu|cuda] [--precision fp32|bf16|fp16] [--threads N]
      [--bin target/release/deepcut-fast] [--json OUT.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infonce_torch import infonce  # noqa: E402  (the same loss as the GPU reference)

GAMMA = 0.3
TAU = 0.1


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def run_ours(a):
    cmd = [
        a.bin, "bench", "--preset", a.preset, "--bf", str(a.bf), "--br", str(a.br),
        "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup),
        "--labels", str(a.labels), "--device", a.device, "--precision", a.precision,
    ]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    print("running:", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(out.stdout)


def synthetic(rows, t, vocab, labels, pad, gen):
    ids = torch.randint(0, vocab, (rows, t), generator=gen)
    ids[ids == pad] = (pad + 1) % vocab
    other = 1 + torch.randint(0, labels - 1, (rows, t), generator=gen)
    y = torch.where(torch.rand(rows, t, generator=gen) < 0.8, 0, other)
    y[:, 0] = -100
    y[:, -1] = -100
    return ids, y


def build_model(ours, device):
    from transformers import AutoConfig, AutoModelForTokenClassification

    cfg = dict(ours["model_config"])
    model_type = cfg.pop("model_type")
    for k in ("architectures", "dtype", "id2label", "label2id"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.num_labels = ours["labels"]
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa")
    return model.to(device).train(), config


def run_torch(a, ours):
    device = torch.device(a.device)
    model, config = build_model(ours, device)
    gen = torch.Generator().manual_seed(0)
    t, bf, br, l = a.seq_len, a.bf, a.br, ours["labels"]
    pad = config.pad_token_id or 0
    ids, y = synthetic(bf + br, t, config.vocab_size, l, pad, gen)
    # [forget view a | forget view b | retain]: one forward, independent dropout per row
    ids = torch.cat([ids[:bf], ids[:bf], ids[bf:]]).to(device)
    y = torch.cat([y[:bf], y[:bf], y[bf:]]).to(device)
    mask = torch.ones_like(ids)
    y_ce = y.clone()
    y_ce[: 2 * bf] = -100  # CE on retain rows only
    labelled = (y != -100).flatten()
    anchor = torch.zeros_like(y, dtype=torch.bool)
    anchor[: 2 * bf] = True
    anchor = anchor.flatten()[labelled]
    z_labels = y.flatten()[labelled]

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-5, betas=(0.9, 0.999), eps=1e-8,
    )
    total = a.warmup + a.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    base = model.base_model
    cuda = device.type == "cuda"
    # the engine's precision: bf16 autocast on either device (so this path runs on a CPU
    # too), fp16 autocast on CUDA, else fp32 (on CUDA without TF32: torch's default)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16 if cuda else None}.get(a.precision)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            h = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [2bf+br, t, c]
            logits = model.classifier(model.dropout(h))
        ce = F.cross_entropy(logits.float().reshape(-1, l), y_ce.reshape(-1), ignore_index=-100)
        z = F.normalize(h.float().reshape(-1, h.shape[-1])[labelled], dim=1)
        lf = infonce(z, z_labels, anchor, TAU)
        loss = ce + GAMMA * lf
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    load_start = loadavg()
    for i in range(total):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    assert torch.isfinite(loss), "PyTorch step produced a non-finite loss"
    # deepcut-fast times its steps pipelined (the next step enqueued before the last one's
    # numbers are read); PyTorch's eager loop is timed per step above, and here back to
    # back with one synchronisation at the end, its best case. The better of the two is
    # PyTorch's step time.
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - t0) / a.steps
    times.sort()
    per_step = statistics.median(times)
    med = min(per_step, back_to_back)
    tokens = (2 * bf + br) * t
    res = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": f"{a.precision} autocast" if amp is not None else "fp32",
        "threads": torch.get_num_threads(),
        "step_time_s": {"median": med, "min": times[0], "max": times[-1],
                        "p10": quantile(times, 0.1), "p90": quantile(times, 0.9)},
        "per_step_median_s": per_step,
        "back_to_back_step_s": back_to_back,
        "timing": "the better of the per-step median (synchronised around each step) and the mean of "
                  "--steps steps run back to back",
        "tokens_per_s": tokens / med,
        "achieved_tflops": ours["flops_per_step"] / med / 1e12,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "last_loss": loss.item(),
    }
    if cuda:
        res["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        import resource
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def quantile(sorted_xs, q):
    pos = q * (len(sorted_xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="minilm-l6", choices=["minilm-l6", "bert-base", "roberta-base"])
    p.add_argument("--bf", type=int, default=8)
    p.add_argument("--br", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--labels", type=int, default=13)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads and the bench's --threads")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the engine's --precision (default: bf16 on cuda, as torch's autocast; fp32 on cpu)")
    p.add_argument("--bin", default="target/release/deepcut-fast", help="the deepcut-fast binary")
    p.add_argument("--json", default=None, help="also write both results to this file")
    a = p.parse_args()
    for name in ("bf", "br", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.seq_len < 3:
        p.error("--seq-len must be at least 3")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if a.precision is None:
        a.precision = "bf16" if a.device == "cuda" else "fp32"
    if a.threads:
        torch.set_num_threads(a.threads)
    if not os.path.exists(a.bin):
        p.error(f"--bin {a.bin}: not found (cargo build --release first)")

    ours = run_ours(a)
    theirs = run_torch(a, ours)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    o, t = ours["step_time_s"], theirs["step_time_s"]
    gib = 2.0**30
    mem_t = theirs.get("peak_memory_bytes", theirs.get("peak_rss_bytes", 0))
    mem_o = ours["device_memory_bytes"] or ours["peak_rss_bytes"]
    print(f"DeepCUT step, {ours['model']} ({ours['parameters'] / 1e6:.1f}M params), bf {a.bf} br {a.br} "
          f"seq {a.seq_len} ({ours['tokens_per_step']} tokens/step), {a.device}, "
          f"{ours['threads']} threads, {a.steps} steps after {a.warmup} warm-up")
    rows = [
        ("", "deepcut-fast", f"PyTorch {theirs['torch']}"),
        ("precision", ours["precision"], theirs["precision"]),
        ("median step (s)", f"{o['median']:.4f}", f"{t['median']:.4f}"),
        ("PyTorch back to back (s)", "", f"{theirs['back_to_back_step_s']:.4f}"),
        ("p10 / p90 (s)", f"{o['p10']:.4f} / {o['p90']:.4f}", f"{t['p10']:.4f} / {t['p90']:.4f}"),
        ("tokens/s", f"{ours['tokens_per_s']:.0f}", f"{theirs['tokens_per_s']:.0f}"),
        ("model TFLOP/s", f"{ours['achieved_tflops']:.3f}", f"{theirs['achieved_tflops']:.3f}"),
        ("peak memory (GiB)", f"{mem_o / gib:.2f}", f"{mem_t / gib:.2f}"),
        ("load avg (start)", str(ours["loadavg_start"]), str(theirs["loadavg_start"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for i, r in enumerate(rows):
        print(f"| {r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]} |")
        if i == 0:
            print(f"| {'-' * w0} | {'-' * w1} | --- |")
    print(f"ratio (deepcut-fast / PyTorch tokens/s): {ratio:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ours": ours, "torch": theirs, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
