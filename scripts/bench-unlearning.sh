#!/usr/bin/env bash
# The unlearning comparison of BENCHMARKS.md: for each forget ratio, the retrained
# reference, DeepCUT and every baseline on the same split, then one table.
#   scripts/bench-unlearning.sh ORIGINAL_MODEL_DIR [RATIOS] [OUT]
# ORIGINAL_MODEL_DIR: the model to unlearn (e.g. the output of
#   deepcut-fast train --model ../shared/models/all-MiniLM-L6-v2 --data ../shared/data/wnut17 --out runs/original)
# Extra `run` options for DeepCUT can be passed in DEEPCUT_OPTS, for SISA in SISA_OPTS.
# SISA's original shard models are trained once from BASE into OUT/sisa-shards and
# reused by every ratio; its seconds are the retraining of the touched shards only
# (the one-time shard cost is shown beside them).
set -euo pipefail
orig=${1:?original model dir}
ratios=${2:-"0.01 0.10"}
out=${3:-runs/bench}
bin=${BIN:-target/release/deepcut-fast}
data=${DATA:-../shared/data/wnut17}
base=${BASE:-../shared/models/all-MiniLM-L6-v2}
methods=${METHODS:-"deepcut finetune gradient-ascent neggrad+ random-labels sisa"}
mkdir -p "$out"
for r in $ratios; do
    d="$out/r$r"
    mkdir -p "$d"
    # the split: drawn once, shared by every method and by the retrained reference
    if [ ! -f "$d/forget.txt" ]; then
        "$bin" run --model "$orig" --data "$data" --forget-ratio "$r" --out "$d/split" --steps 1 --method finetune --quiet --force >/dev/null 2>&1 || true
        cp "$d/split/forget.txt" "$d/forget.txt"
    fi
    if [ ! -f "$d/retrain/train.json" ]; then
        /usr/bin/time -f "%e" -o "$d/retrain.seconds" "$bin" train --model "$base" --data "$data" --exclude "$d/forget.txt" --out "$d/retrain" --select last --quiet --force
    fi
    for m in $methods; do
        [ -f "$d/$m/report.json" ] && continue
        opts=""
        [ "$m" = deepcut ] && opts="${DEEPCUT_OPTS:-}"
        # shards fitted like the retrained reference (--select last)
        [ "$m" = sisa ] && opts="--base $base --sisa-shards $out/sisa-shards --train-select last ${SISA_OPTS:-}"
        "$bin" run --model "$orig" --data "$data" --forget "$d/forget.txt" --out "$d/$m" --method "$m" --retrain-ref "$d/retrain/model" --eval-cache "$out/eval-cache" --quiet --force $opts
    done
done
python3 - "$out" $ratios <<'PY'
import json, sys, os
out, ratios = sys.argv[1], sys.argv[2:]
print("| ratio | model | forget F1 | retain F1 | dev F1 | test F1 | MIA AUC | steps | seconds |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in ratios:
    d = f"{out}/r{r}"
    reps = {m: json.load(open(f"{d}/{m}/report.json")) for m in sorted(os.listdir(d)) if os.path.exists(f"{d}/{m}/report.json") and m != "split"}
    if not reps: continue
    any_r = next(iter(reps.values()))
    o, rt = any_r["reference"]["original"], any_r["reference"].get("retrain") or {}
    f = lambda m, s: f'{m.get(s, {}).get("f1", float("nan")):.3f}'
    print(f'| {r} | original | {f(o,"forget")} | {f(o,"retain")} | {f(o,"dev")} | {f(o,"test")} | {o["mia_auc"]:.3f} | - | - |')
    rs = open(f"{d}/retrain.seconds").read().strip() if os.path.exists(f"{d}/retrain.seconds") else "?"
    if rt: print(f'| {r} | retrain | {f(rt,"forget")} | {f(rt,"retain")} | {f(rt,"dev")} | {f(rt,"test")} | {rt["mia_auc"]:.3f} | - | {rs} |')
    for m, rep in reps.items():
        x = rep["metrics"]
        secs = f'{rep["cost"]["seconds"]:.0f}'
        if "original_shards" in rep["cost"]:
            secs += f' (+{rep["cost"]["original_shards"]["seconds"]:.0f} once)'
        print(f'| {r} | {m} | {f(x,"forget")} | {f(x,"retain")} | {f(x,"dev")} | {f(x,"test")} | {x["mia_auc"]:.3f} | {rep["cost"]["steps"]} | {secs} |')
PY
