#!/usr/bin/env python3
"""A `deepcut-fast run` replayed in PyTorch on the same device: the end-to-end wall clock of
the same unlearning run, phase by phase, and the metrics side by side (issue #6: "the
unlearning run ... end to end: its wall-clock on the GPU against PyTorch on the same GPU").

It reads the run's report.json and does the same work with transformers:
- load the same model (config.model: tokenizer.json + model.safetensors, HF layout), the
  same data (config.data) and the same forget sentences (forget.file);
- reference evaluation of the original model on forget, retain, dev and test (eval mode,
  entity F1 and the per-sentence losses of the membership-inference AUC);
- as many DeepCUT steps as the run took (cost.steps), SPEC section 4: B_f forget sentences
  in two dropout views and B_r retain sentences in one forward, CE on retain tokens,
  class-masked InfoNCE over the labelled tokens' unit final hidden states with the forget
  tokens as anchors (scripts/infonce_torch.py), loss CE + gamma L_f, clipping, AdamW
  (no decay on biases and LayerNorm), linear warm-up and decay;
- a forget-set evaluation at every step where the run checked its stopping rule
  (history.checks);
- the final evaluation of the unlearned model on the four sets.

What differs, on purpose: batches are drawn with PyTorch's generator (the same sizes and
the same streams, not the same sentences), and evaluation runs 64 windows per batch sorted
by length, the usual PyTorch practice. So the F1 columns are a sanity check (they should
be close), not a parity test; the seconds compare the same amount of work. The model
runs in the run's precision: under bf16 autocast (on CUDA or the CPU), fp16 with a
GradScaler on CUDA, else fp32; the losses in fp32, as SPEC section 7 says.

Only the InfoNCE defaults are replayed (same-class denominator, own view negative,
detached columns, all anchors); a run with other options is refused.

Usage:
  python3 scripts/deepcut-torch.py --report RUN/report.json [--device cpu|cuda]
      [--threads N] [--json OUT.json]
  python3 scripts/deepcut-torch.py --report RUN/report.json --plan [--device cpu|cuda]
      (what would be replayed, as JSON, without torch: tests/torch_scripts.rs)
"""
import argparse
import json
import math
import os
import sys
import time

# torch, torch.nn.functional and the loss are imported by main() after --plan's early exit,
# so that what the replay reads from a report is checked where torch is not installed (CI)
torch = F = infonce = None

EVAL_BATCH = 64


def load_torch():
    global torch, F, infonce
    import torch as _torch
    import torch.nn.functional as _F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from infonce_torch import infonce as _infonce  # the same loss as compare-torch.py

    torch, F, infonce = _torch, _F, _infonce


def read_conll(path):
    """Sentences as (words, tags): one `word<TAB or space>tag` per line, blank lines between."""
    sents, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    sents.append((words, tags))
                    words, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                sys.exit(f"{path}:{n}: expected `word tag`, got {line!r}")
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        sents.append((words, tags))
    return sents


def encode(tok, sents, label2id, max_len, cls_id, sep_id):
    """Every sentence as windows of whole words of at most max_len subwords with the special
    tokens (SPEC section 2): (sentence index, first word, input ids, labels at first
    subwords, -100 elsewhere)."""
    items = []
    for si, (words, tags) in enumerate(sents):
        # per word, its subword ids (the fast tokenizer keeps word boundaries: word_ids)
        enc = tok(words, is_split_into_words=True, add_special_tokens=False)
        per_word = [[] for _ in words]
        for t, w in zip(enc["input_ids"], enc.word_ids()):
            per_word[w].append(t)
        start = 0
        while start < len(words):
            ids, labels, w = [cls_id], [-100], start
            while w < len(words):
                sub = per_word[w] or [tok.unk_token_id]
                if len(ids) + len(sub) + 1 > max_len and w > start:
                    break
                ids += sub[: max_len - 2]
                labels += [label2id[tags[w]]] + [-100] * (len(sub[: max_len - 2]) - 1)
                w += 1
            ids.append(sep_id)
            labels.append(-100)
            items.append((si, start, ids, labels))
            start = w
    return items


def pad_batch(batch, pad_id, device):
    t = max(len(ids) for _, _, ids, _ in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), t), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for r, (_, _, i, l) in enumerate(batch):
        ids[r, : len(i)] = torch.tensor(i)
        lab[r, : len(l)] = torch.tensor(l)
        mask[r, : len(i)] = 1
    return ids.to(device), lab.to(device), mask.to(device)


def entities(tags):
    """Entity chunks (start, end, type) of one sentence as conlleval / seqeval's default
    mode finds them: a chunk starts at B-X, or at I-X after O or another type, and ends
    before O, B-*, or a tag of another type."""
    out, start, typ = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, ty = (t.split("-", 1) + [""])[:2] if t != "O" else ("O", "")
        if typ is not None and (prefix in ("O", "B") or ty != typ):
            out.add((start, i - 1, typ))
            typ = None
        if prefix == "B" or (prefix == "I" and typ is None):
            start, typ = i, ty
    return out


def f1(gold, pred):
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        eg, ep = entities(g), entities(p)
        tp += len(eg & ep)
        n_pred += len(ep)
        n_gold += len(eg)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def auc(members, others):
    """P(a member's loss < a non-member's loss), ties counted half: the membership-inference
    AUC over per-sentence mean token losses (SPEC section 6)."""
    if not members or not others:
        return float("nan")
    allv = sorted([(x, 0) for x in members] + [(x, 1) for x in others])
    # rank-sum (Mann-Whitney U) with average ranks for ties
    ranks, i = {}, 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    r_others = sum(ranks[k] for k, (_, g) in enumerate(allv) if g == 1)
    u = r_others - len(others) * (len(others) + 1) / 2
    return u / (len(members) * len(others))


def plan(rep, report, device):
    """Everything the replay takes from a run's report.json, read and checked without torch
    (`--plan` prints it): the options it replays, the precision, where the model, data and
    forget set are, the steps and checks, and our side's seconds and F1s. Exits with a
    message naming the report where the run cannot be replayed."""
    def need(cond, what):
        if not cond:
            sys.exit(f"{report}: {what}")

    cfg = rep["config"]
    un = cfg["unlearning"]
    for key, want in [("contrast_denominator", "same-class"), ("own_view", "negative"),
                      ("detach_columns", True), ("anchors", "all")]:
        need(un.get(key, want) == want, f"{key} = {un.get(key)}; only the InfoNCE defaults are replayed")
    need(rep.get("method", un.get("method", "deepcut")) == "deepcut",
         f"method {rep.get('method')}; only DeepCUT runs are replayed")
    # report.json's "precision" is an object ({"precision": "bf16", "describe": ...});
    # config.unlearning.precision the plain name
    prec = rep.get("precision", un.get("precision", "fp32"))
    if isinstance(prec, dict):
        prec = prec.get("precision", "fp32")
    need(prec in ("fp32", "bf16", "fp16"), f"precision {prec!r}")
    # bf16 autocast on either device (the CPU has it too, so this path runs anywhere);
    # fp16 needs CUDA (its GradScaler), elsewhere the replay is fp32
    autocast = prec if prec == "bf16" or (prec == "fp16" and device.startswith("cuda")) else None
    model_dir = cfg["model"]
    finetune = None
    if rep.get("original_training"):
        # --model had no head for the data: the run fine-tuned it first, into OUT/original
        # (that fine-tune is not replayed; its model is where the unlearning started)
        model_dir = os.path.join(cfg["out"], "original", "model")
        finetune = ((rep["original_training"] or {}).get("record") or {}).get("seconds")
    for f in ("config.json", "model.safetensors"):
        need(os.path.isfile(os.path.join(model_dir, f)), f"the model it starts from has no {f}: {model_dir}")
    data = cfg["data"]
    for split in ("train", "dev", "test"):
        need(os.path.isfile(os.path.join(data, f"{split}.conll")), f"no {split}.conll in {data}")
    train_n = len(read_conll(os.path.join(data, "train.conll")))
    # one 0-based train index per line; `#` starts a comment
    lines = (ln.split("#", 1)[0].strip() for ln in open(rep["forget"]["file"]))
    forget = [int(x) for x in lines if x]
    need(len(forget) == rep["forget"]["count"] and all(0 <= i < train_n for i in forget),
         f"{rep['forget']['file']} does not hold {rep['forget']['count']} train indices below {train_n}")
    cost = rep["cost"]
    ours = {
        "reference_and_final_eval": cost.get("reference_eval_seconds"),
        "steps": (cost.get("seconds") or 0) - (cost.get("stopping_rule_eval_seconds") or 0),
        "stopping_checks": cost.get("stopping_rule_eval_seconds"),
        "wall": cost.get("wall_seconds"),
    }
    # a run that fine-tuned its original first counts that in its wall clock; the replay
    # starts from the fine-tuned model, so the comparison leaves the fine-tune out
    if finetune and ours["wall"]:
        ours["wall"] -= finetune
    return {
        "precision": prec,
        "autocast": autocast,
        "model_dir": model_dir,
        "model_type": json.load(open(os.path.join(model_dir, "config.json"))).get("model_type", ""),
        "data": data,
        "forget": forget,
        "train_sentences": train_n,
        "unlearning": un,
        "steps": int(cost["steps"]),
        "ours_tokens": cost.get("tokens"),
        "check_steps": sorted({int(c["step"]) for c in rep.get("history", {}).get("checks", [])}),
        "fixed_steps": rep.get("stopping", {}).get("rule") == "fixed steps",
        "ours_seconds": ours,
        "finetune_seconds_left_out": finetune,
        "ours_unlearned": {k: rep["metrics"][k]["f1"] for k in ("forget", "retain", "dev", "test")}
        | {"mia_auc": rep["metrics"].get("mia_auc")},
        "reference_original": rep.get("reference", {}).get("original", {}),
        "backend": cfg.get("backend"),
    }


class Runner:
    def __init__(self, a, pl):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        un = pl["unlearning"]
        self.un, self.device = un, torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pl["autocast"])
        self.precision = f"{pl['precision']} autocast" if self.amp else "fp32"
        t0 = time.perf_counter()
        model_dir = pl["model_dir"]
        kind = pl["model_type"]
        extra = {"add_prefix_space": True} if kind in ("roberta", "xlm-roberta") else {}
        self.tok = AutoTokenizer.from_pretrained(model_dir, **extra)
        # fp32 master weights whatever the checkpoint holds (gpu-check carries a bf16 copy;
        # some transformers versions load a checkpoint in its own dtype)
        self.model = AutoModelForTokenClassification.from_pretrained(
            model_dir, attn_implementation="sdpa").float().to(self.device)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        label2id = {v: k for k, v in self.id2label.items()}
        data = pl["data"]
        split = {s: read_conll(os.path.join(data, f"{s}.conll")) for s in ("train", "dev", "test")}
        forget_idx = pl["forget"]
        fset = set(forget_idx)
        self.sets = {
            "forget": [split["train"][i] for i in forget_idx],
            "retain": [s for i, s in enumerate(split["train"]) if i not in fset],
            "dev": split["dev"],
            "test": split["test"],
        }
        for name, sents in self.sets.items():
            for words, tags in sents:
                for t in tags:
                    if t not in label2id:
                        sys.exit(f"{data}: tag {t} ({name}) is not in the model's id2label")
        max_len = int(un.get("max_len", 128))
        cls_id = self.tok.cls_token_id if self.tok.cls_token_id is not None else self.tok.bos_token_id
        sep_id = self.tok.sep_token_id if self.tok.sep_token_id is not None else self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id or 0
        self.items = {k: encode(self.tok, v, label2id, max_len, cls_id, sep_id) for k, v in self.sets.items()}
        self.load_seconds = time.perf_counter() - t0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def evaluate(self, name):
        """Entity F1 and per-sentence mean token losses of one set, eval mode."""
        with torch.no_grad():
            return self._evaluate(name)

    def _evaluate(self, name):
        self.model.eval()
        items = sorted(self.items[name], key=lambda it: len(it[2]))
        sents = self.sets[name]
        pred = [["O"] * len(w) for w, _ in sents]
        loss_sum = [0.0] * len(sents)
        loss_n = [0] * len(sents)
        for b0 in range(0, len(items), EVAL_BATCH):
            batch = items[b0 : b0 + EVAL_BATCH]
            ids, lab, mask = pad_batch(batch, self.pad_id, self.device)
            with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            logits = logits.float()
            tok_loss = F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")
            arg = logits.argmax(-1).cpu()
            tok_loss, lab_c = tok_loss.cpu(), lab.cpu()
            for r, (si, w0, _, _) in enumerate(batch):
                pos = (lab_c[r] != -100).nonzero().squeeze(1)
                for k, p in enumerate(pos.tolist()):
                    pred[si][w0 + k] = self.id2label[int(arg[r, p])]
                loss_sum[si] += float(tok_loss[r, pos].sum())
                loss_n[si] += len(pos)
        gold = [t for _, t in sents]
        losses = [s / n for s, n in zip(loss_sum, loss_n) if n]
        return {"f1": f1(gold, pred), "sentence_losses": losses}

    def evaluate_all(self):
        self.sync()
        t0 = time.perf_counter()
        out = {k: self.evaluate(k) for k in ("forget", "retain", "dev", "test")}
        self.sync()
        res = {k: v["f1"] for k, v in out.items()}
        res["mia_auc"] = auc(out["forget"]["sentence_losses"], out["test"]["sentence_losses"])
        res["seconds"] = time.perf_counter() - t0
        return res

    def unlearn(self, steps, check_steps, budget):
        un, dev = self.un, self.device
        bf, br = int(un["bf"]), int(un["br"])
        gen = torch.Generator().manual_seed(int(un.get("seed", 0)))
        torch.manual_seed(int(un.get("seed", 0)))  # dropout masks: the same run twice gives the same numbers

        def stream(items):
            while True:
                for i in torch.randperm(len(items), generator=gen).tolist():
                    yield items[i]

        fs, rs = stream(self.items["forget"]), stream(self.items["retain"])
        model = self.model
        named = list(model.named_parameters())
        no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
        decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
        lr = float(un["lr"])
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(un.get("weight_decay", 0.01))},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.999), eps=1e-8)
        warm = max(1, int(float(un.get("warmup_ratio", 0.1)) * budget))
        # lr at step s (1-based): linear warm-up to lr over `warm` steps, then linear decay
        # to lr / (budget - warm) at the last step of the budget (the engine's schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s + 1 <= warm else max(0.0, (budget - s) / max(1, budget - warm)))
        scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        gamma, tau, clip = float(un["gamma"]), float(un["tau"]), float(un.get("clip", 1.0))
        checks, tokens = [], 0
        self.sync()
        t0 = time.perf_counter()
        check_seconds = 0.0
        for step in range(1, steps + 1):
            model.train()
            fb = [next(fs) for _ in range(bf)]
            rb = [next(rs) for _ in range(br)]
            ids, lab, mask = pad_batch(fb + fb + rb, self.pad_id, dev)  # views a, b, retain
            tokens += int(mask.sum())
            y_ce = lab.clone()
            y_ce[: 2 * bf] = -100
            labelled = (lab != -100).flatten()
            anchor = torch.zeros_like(lab, dtype=torch.bool)
            anchor[: 2 * bf] = True
            anchor = anchor.flatten()[labelled]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = model.classifier(model.dropout(h))
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y_ce.reshape(-1), ignore_index=-100)
            z = F.normalize(h.float().reshape(-1, h.shape[-1])[labelled], dim=1)
            loss = ce + gamma * infonce(z, lab.flatten()[labelled], anchor, tau)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if step in check_steps:
                self.sync()
                c0 = time.perf_counter()
                checks.append({"step": step, "forget_f1": self.evaluate("forget")["f1"]})
                self.sync()
                check_seconds += time.perf_counter() - c0
        self.sync()
        seconds = time.perf_counter() - t0
        assert math.isfinite(loss.item()), "PyTorch step produced a non-finite loss"
        return {"seconds": seconds, "check_seconds": check_seconds, "steps": steps, "tokens": tokens,
                "checks": checks, "last_loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", required=True, help="report.json of a `deepcut-fast run`")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--plan", action="store_true",
                    help="print what would be replayed (JSON) and stop; needs no torch")
    a = ap.parse_args()
    rep = json.load(open(a.report))
    pl = plan(rep, a.report, a.device)
    if a.plan:
        print(json.dumps(pl, indent=1))
        return
    load_torch()
    if a.threads:
        torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    r = Runner(a, pl)
    if r.cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"PyTorch {torch.__version__} on {a.device} ({r.precision}, {torch.get_num_threads()} threads); "
          f"replaying {a.report}", file=sys.stderr)
    original = r.evaluate_all()
    steps = pl["steps"]
    check_steps = set(pl["check_steps"])
    un = pl["unlearning"]
    if pl["fixed_steps"]:
        budget = steps
    else:
        budget = max(steps, math.ceil(float(un.get("max_forget_epochs", 10)) * len(r.items["forget"]) / int(un["bf"])))
    loop = r.unlearn(steps, check_steps, budget)
    final = r.evaluate_all()
    wall = time.perf_counter() - t_all
    res = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if r.cuda else "cpu",
        "precision": r.precision,
        "threads": torch.get_num_threads(),
        "report": a.report,
        "seconds": {
            "load": r.load_seconds,
            "reference_and_final_eval": original["seconds"] + final["seconds"],
            "steps": loop["seconds"] - loop["check_seconds"],
            "stopping_checks": loop["check_seconds"],
            "wall": wall,
        },
        "steps": steps,
        "tokens": loop["tokens"],
        "original": {k: original[k] for k in ("forget", "retain", "dev", "test", "mia_auc")},
        "unlearned": {k: final[k] for k in ("forget", "retain", "dev", "test", "mia_auc")},
        "checks": loop["checks"],
    }
    if r.cuda:
        res["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        import resource
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ours_s = pl["ours_seconds"]
    finetune = pl["finetune_seconds_left_out"]
    if finetune:
        res["ours_finetune_seconds_left_out"] = finetune
        print(f"(the run fine-tuned its original first, {finetune:.1f} s: left out of its wall clock below)")
    res["ours"] = {"seconds": ours_s, "backend": pl["backend"], "unlearned": pl["ours_unlearned"]}
    res["ratio_wall"] = wall / ours_s["wall"] if ours_s["wall"] else None
    print(f"\n{'':28} {'deepcut-fast':>13} {'PyTorch':>10} {'PyTorch/ours':>13}")
    for k in ("reference_and_final_eval", "steps", "stopping_checks", "wall"):
        o, t = ours_s.get(k), res["seconds"][k]
        ratio = f"{t / o:.2f}x" if o else "-"
        print(f"{k + ' (s)':28} {o if o is None else round(o, 2):>13} {t:>10.2f} {ratio:>13}")
    # the replay draws its own batches (same sizes, its own shuffle), so tokens may differ a little
    print(f"{'steps':28} {pl['steps']:>13} {steps:>10}")
    print(f"{'tokens (no padding)':28} {str(pl['ours_tokens']):>13} {loop['tokens']:>10}")
    print(f"\n{'unlearned model':28} {'deepcut-fast':>13} {'PyTorch':>10}")
    for k in ("forget", "retain", "dev", "test", "mia_auc"):
        print(f"{k:28} {res['ours']['unlearned'][k]:>13.4f} {final[k]:>10.4f}")
    # The original model is the same weights on both sides, so its evaluation is a check on
    # this script (encoding, windows, F1, AUC): the numbers should agree to rounding (the
    # engine's bf16 / fp16 evaluation rounds, so there they may differ in the 3rd digit).
    ref = pl["reference_original"]
    print(f"\n{'original model':28} {'deepcut-fast':>13} {'PyTorch':>10}")
    for k in ("forget", "retain", "dev", "test", "mia_auc"):
        theirs = ref.get(k, {}).get("f1") if k != "mia_auc" else ref.get("mia_auc")
        print(f"{k:28} {theirs if theirs is None else round(theirs, 4):>13} {original[k]:>10.4f}")
    gaps = [abs(ref[k]["f1"] - original[k]) for k in ("forget", "retain", "dev", "test") if k in ref]
    res["original_f1_max_gap"] = max(gaps) if gaps else None
    o_wall, o_steps = ours_s["wall"] or float("nan"), ours_s["steps"]
    gap = res["original_f1_max_gap"]
    print(f"E2E wall ours {o_wall:.1f} s, torch {wall:.1f} s (torch/ours {wall / o_wall:.2f}x); "
          f"steps ours {o_steps:.2f} s, torch {res['seconds']['steps']:.2f} s; original F1 gap "
          f"{'n/a' if gap is None else f'{100 * gap:.2f} points'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
