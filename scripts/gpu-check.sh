#!/usr/bin/env bash
# The GPU check, one command, for a GPU machine that has the NVIDIA driver, CUDA (cuBLAS),
# PyTorch and nvcc but no Rust toolchain. It runs test binaries built on a CPU machine
# and carried over, and prints a short table last. Budget: DEEPCUT_CHECK_BUDGET seconds (290:
# issue #5 asks for under 5 minutes, and a session's 15 device minutes must leave room for a
# second call); a step that would start with under 15 s left says SKIP in the table. Steps 6,
# 8 and 7 come last, in that order, and usually fall to the budget: `--e2e` runs step 8
# alone, and DEEPCUT_CHECK_BUDGET=540 (within a 600 s call) all of them.
#
#   0. `deepcut-fast devices`: the driver, cuBLAS, NVTX and kernel image the CLI opens (its
#      cuBLAS link folder, where it needs one, goes on the test binaries' LD_LIBRARY_PATH);
#   1. GPU-vs-CPU parity: every CUDA op against its CPU twin and a whole DeepCUT step
#      (tests/gpu_parity.rs), with DEEPCUT_REQUIRE_GPU=1 so a missing GPU fails instead
#      of skipping;
#   2. throughput (tests/gpu_bench.rs): the MiniLM-shape training step on GPU and CPU, the
#      fused InfoNCE at 4k, 16k and 64k rows with its device memory, and every kernel
#      family at the roberta-base step shape against its floor (copy bandwidth, or the
#      card's measured bf16 GEMM rate), attention in fp32 (CUDA cores) and bf16 (tensor
#      cores);
#   3. the same InfoNCE in PyTorch on the same GPU at 4k, 16k, 64k columns
#      (scripts/infonce_torch.py), when torch is importable;
#   4. the CLI's device self-check (`bench --device auto`, fp32 and bf16: does auto take the
#      GPU?), then a short DeepCUT run on GPU and on CPU with the same seed (--device cuda / cpu), in
#      fp32 and in bf16 (the CPU twin of the tensor-core path),
#      on DEEPCUT_CHECK_MODEL (default tests/golden/roberta-wnut17) and DEEPCUT_CHECK_DATA
#      (default: the WNUT17 slice that --build writes to target/gpu-check/data);
#   4b. that bf16 GPU run replayed in PyTorch on the same GPU (scripts/deepcut-torch.py):
#      end-to-end wall clock per phase, F1 side by side;
#   5. `deepcut-fast bench --precision bf16` next to the same DeepCUT step in PyTorch at the
#      roberta-base shape, bf/br 8/32 and 32/128 (scripts/compare-torch.py --device cuda),
#      when torch and transformers import;
#   5b. the device time of every op and phase of that step (`bench --op-times`, CUDA events
#      around the NVTX ranges), 8/32 and 32/128, and MiniLM at 8/32 with 32-token
#      sequences (the unlearning run's small steps): where the time goes, without Nsight;
#   6. three bench steps under `nsys profile`, and the NVTX range summary, when nsys exists;
#   8. issue #6's end-to-end comparison: the WNUT17 / MiniLM / ratio 0.10 unlearning run with
#      the shipped defaults, bf16 on the GPU, then replayed in PyTorch on the same GPU, when
#      --build packed a model (target/gpu-check/e2e);
#   7. the CPU backend's MiniLM step at 4 threads and at all of the machine's cores, with each
#      CPU GEMM library (matrixmultiply, the `gemm` crate).
#
# Without a GPU, `LD_LIBRARY_PATH=$PWD/target/tmp/cuda-emu scripts/gpu-check.sh` runs it on the
# CPU emulator of tests/cuda_emu (built by `cargo test --test gpu_parity`) to check the script
# itself: parity passes there; the bench and the runs are too slow for their time limits.
#
# Build the binaries on the machine with Rust (no GPU needed; NVRTC from the pip wheels):
#     scripts/gpu-check.sh --build [MODEL_DIR]
# which runs `cargo test --release --no-run --test gpu_parity --test gpu_bench` with
# DEEPCUT_REQUIRE_KERNELS=1 and debug info off, builds the CLI, and puts all three, gzipped, in
# target/gpu-check/ with a WNUT17 slice, and step 8's payload: a model in bf16, gzipped, and
# the full WNUT17. The model: MODEL_DIR, else $DEEPCUT_E2E_MODEL, else runs/original/model
# (`deepcut-fast train` of all-MiniLM-L6-v2 on WNUT17, as BENCHMARKS.md's CPU runs used), else
# ../shared/models/all-MiniLM-L6-v2, which the GPU run then fine-tunes first. Carry that one
# folder (~47 MB; the 64 MiB limit counts the work tree too). Then, on the GPU machine, from
# the repository root:
#     scripts/gpu-check.sh
# It looks for the binaries in $DEEPCUT_GPU_BIN, target/gpu-check/ (unpacked into
# target/gpu-check-bin/), then target/release/deps/. Logs go to target/gpu-check-logs/, and
# with $OUT set (the device tool) also to $OUT/gpu-check-logs.tgz with the table in
# $OUT/summary.txt.
#
# Second calls with the same carry, when a session has device time left:
#     scripts/gpu-check.sh --e2e        step 8 alone, with longer limits (300 s for the run,
#                                       480 s for PyTorch), when the check's budget cut it;
#                                       DEEPCUT_E2E_ARGS adds run options (e.g.
#                                       "--max-forget-epochs 1": 43 steps instead of up to 424)
#     scripts/gpu-check.sh --sanitize   compute-sanitizer (memcheck, racecheck, then with the
#                                       time left synccheck, initcheck) over the kernel
#                                       parity tests on the card
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ] || [ "${1:-}" = "--build-e2e" ]; then
    set -e
    eval "$(scripts/nvrtc-env.sh)"
    export DEEPCUT_REQUIRE_KERNELS=1 CARGO_PROFILE_RELEASE_DEBUG=0
    # The lent machines are H100 / H200 (sm_90): their cubin plus PTX for newer cards keeps
    # the carried folder under the 64 MiB limit (every binary embeds every kernel).
    export DEEPCUT_CUDA_ARCHS="${DEEPCUT_CUDA_ARCHS:-sm_90,compute_90}"
    # step 8's model: the one given, else the fine-tuned MiniLM that BENCHMARKS.md's CPU runs
    # used, else the pretrained all-MiniLM-L6-v2 (the GPU run then fine-tunes it first)
    model="${2:-${DEEPCUT_E2E_MODEL:-}}"
    if [ -z "$model" ]; then
        for m in runs/original/model ../shared/models/all-MiniLM-L6-v2; do
            [ -f "$m/model.safetensors" ] && { model=$m; break; }
        done
    fi
    rm -rf target/gpu-check target/gpu-e2e && mkdir -p target/gpu-check/data
    cargo test --release --no-run --test gpu_parity --test gpu_bench --message-format=json-render-diagnostics \
        | grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//' > target/gpu-check/.list
    while read -r exe; do
        case "$(basename "$exe")" in
            gpu_parity-*) cp "$exe" target/gpu-check/gpu_parity ;;
            gpu_bench-*) cp "$exe" target/gpu-check/gpu_bench ;;
        esac
    done < target/gpu-check/.list
    rm -f target/gpu-check/.list
    # the CLI too, for the DeepCUT runs of step 4, with a small fine-tuned model
    # (tests/golden/roberta-wnut17, carried with the work tree) and a WNUT17 slice
    cargo build --release --bin deepcut-fast
    cp target/release/deepcut-fast target/gpu-check/
    if command -v strip >/dev/null; then
        strip target/gpu-check/gpu_parity target/gpu-check/gpu_bench target/gpu-check/deepcut-fast
    fi
    python3 - ../shared/data/wnut17 target/gpu-check/data <<'PY'
import sys
src, dst = sys.argv[1:3]
for split, n in (("train", 400), ("dev", 100), ("test", 100)):
    sents = open(f"{src}/{split}.conll").read().split("\n\n")
    open(f"{dst}/{split}.conll", "w").write("\n\n".join(s for s in sents[:n] if s.strip()) + "\n\n")
PY
    # issue #6's end-to-end run (step 8): the model's weights in bf16 (half the bytes; the
    # engine and transformers both load bf16 safetensors), the rest of its folder's files as
    # they are, and the full WNUT17
    if [ -n "$model" ] && [ -f "$model/model.safetensors" ]; then
        echo "step 8's model: $model"
        mkdir -p target/gpu-check/e2e/model target/gpu-check/e2e/data
        for f in "$model"/*; do
            if [ -f "$f" ] && [ "$(basename "$f")" != model.safetensors ]; then cp "$f" target/gpu-check/e2e/model/; fi
        done
        # plain Python (no numpy / torch here): f32 -> bf16 rounded to nearest even
        python3 - "$model/model.safetensors" target/gpu-check/e2e/model/model.safetensors <<'PY'
import array, json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head, base = json.loads(raw[8:8 + n]), 8 + n
meta = head.pop("__metadata__", None) or {}
out_head, blobs, off = {"__metadata__": dict(meta, format="pt")}, [], 0
for name, t in sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    s, e = t["data_offsets"]
    blob, dtype = raw[base + s:base + e], t["dtype"]
    if dtype == "F32":
        a = array.array("I")
        a.frombytes(blob)
        blob, dtype = array.array("H", [((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF for u in a]).tobytes(), "BF16"
    out_head[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [off, off + len(blob)]}
    blobs.append(blob)
    off += len(blob)
h = json.dumps(out_head, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
        f.write(b)
PY
        cp ../shared/data/wnut17/{train,dev,test}.conll target/gpu-check/e2e/data/
        chmod -R u+w target/gpu-check/e2e
        gzip -9 target/gpu-check/e2e/model/model.safetensors
    else
        echo "note: no model for step 8 (${model:-none found}; give one: --build MODEL_DIR): the check's"
        echo "      end-to-end row (issue #6) will say SKIP"
    fi
    # gzip: the carry limit (64 MiB) counts the work tree too; the check unpacks on its machine
    gzip -9 target/gpu-check/gpu_parity target/gpu-check/gpu_bench target/gpu-check/deepcut-fast
    ls -lR target/gpu-check/
    du -sh target/gpu-check/
    echo "carry target/gpu-check to the GPU machine, then run scripts/gpu-check.sh there"
    exit 0
fi

T0=$(date +%s)
# Logs stay here; with $OUT set (the device tool's folder that comes back), they are also
# archived there at the end as gpu-check-logs.tgz next to summary.txt: that tool returns at
# most 8 files, and the logs are many.
LOGS=target/gpu-check-logs
# One device call may run 600 s at most, and a run killed by that prints no table: every
# step's time limit is cut to what is left of DEEPCUT_CHECK_BUDGET (default 290 s), and a
# step that would start with under 15 s left is skipped with a row saying so.
BUDGET=${DEEPCUT_CHECK_BUDGET:-290}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
cap() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 1 ] && want=1; echo "$want"; }
enough() { [ "$(left)" -ge 15 ] || { row "$1" "SKIP" "time budget ($BUDGET s) spent"; return 1; }; }
mkdir -p "$LOGS"
ROWS=()
row() { ROWS+=("$(printf '%-34s | %-8s | %s' "$1" "$2" "$3")"); }
elapsed() { echo $(( $(date +%s) - T0 ))s; }

# ---- the binaries ----------------------------------------------------------------------------
find_bin() {
    local name=$1 d
    for d in "${DEEPCUT_GPU_BIN:-}" target/gpu-check; do
        [ -n "$d" ] || continue
        [ -x "$d/$name" ] && { echo "$d/$name"; return 0; }
        # --build gzips them (the carry limit); unpacked into target/gpu-check-bin each call
        if [ -f "$d/$name.gz" ]; then
            mkdir -p target/gpu-check-bin && gunzip -c "$d/$name.gz" >"target/gpu-check-bin/$name" \
                && chmod +x "target/gpu-check-bin/$name" && { echo "target/gpu-check-bin/$name"; return 0; }
        fi
    done
    # newest cargo test binary, not its .d file
    ls -t target/release/deps/"$name"-* 2>/dev/null | grep -v '\.d$' | head -1
}
PARITY=$(find_bin gpu_parity)
BENCH=$(find_bin gpu_bench)

# ---- libraries: the toolkit's, then the pip wheels PyTorch brings (cuBLAS) -------------------
LIBS=""
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64; do
    [ -d "$d" ] && LIBS="$LIBS:$d"
done
NV=$(python3 -c 'import nvidia, os; print(os.pathsep.join(nvidia.__path__))' 2>/dev/null || true)
IFS=: read -r -a NVROOTS <<<"$NV"
for root in "${NVROOTS[@]}"; do
    for d in "$root"/*/lib; do [ -d "$d" ] && LIBS="$LIBS:$d"; done
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$LIBS"
# cudarc (CUDA 12 bindings) opens libcublas.so / libcublasLt.so or their .so.12; where only
# another cuBLAS exists (CUDA 13's .so.13 from PyTorch's cu13 wheels, a venv's cuBLAS 12), the
# CLI links a pair the driver runs under those names (src/backend/cuda/libs.rs) and says where
# in `deepcut-fast devices`; the test binaries get that folder first on LD_LIBRARY_PATH.
# (The --e2e CLI does the same for itself.)
CLI=$(find_bin deepcut-fast)
if [ -n "$CLI" ]; then
    timeout 60 "$CLI" devices --no-self-check --json "$LOGS/devices.json" >"$LOGS/devices.txt" 2>&1
    SHIM=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cuda"]["cublas"]["shim"] or "")' \
        "$LOGS/devices.json" 2>/dev/null)
    if [ -n "$SHIM" ]; then
        export LD_LIBRARY_PATH="$SHIM:$LD_LIBRARY_PATH"
        echo "note: cuBLAS linked under the CUDA 12 names in $SHIM"
    fi
fi
export DEEPCUT_REQUIRE_GPU=1
export NVIDIA_TF32_OVERRIDE=0  # fp32 parity: never let the driver turn sgemm into TF32

# A run replayed by scripts/deepcut-torch.py on this GPU (steps 4b and 8): one row, NAME,
# with the replay's E2E line; OUT.json and OUT.log beside the logs; limit LIMIT s (cut to the
# budget).
replay_in_torch() {
    local name=$1 report=$2 out=$3 limit rc res
    limit=$(cap "$4")
    timeout "$limit" python3 scripts/deepcut-torch.py --report "$report" --device cuda \
        --json "$out.json" >"$out.log" 2>&1
    rc=$?
    tail -n 24 "$out.log"
    res=$(grep '^E2E' "$out.log" | sed 's/^E2E //')
    row "$name" "$([ "$rc" = 0 ] && echo ok || { [ "$rc" = 124 ] && echo TIMEOUT; } || echo "rc=$rc")" \
        "${res:-no result (limit $limit s)}; $out.log"
}

# Issue #6's end-to-end comparison: the WNUT17 / MiniLM / ratio 0.10 unlearning run with the
# shipped defaults, bf16 on the GPU, then the same run replayed in PyTorch on the same GPU
# (scripts/deepcut-torch.py). Needs the payload --build packs (target/gpu-check/e2e). Arguments: the run's and the replay's time limits (cut to the budget).
e2e() {
    local run_cap=$1 torch_cap=$2 rc
    rm -rf "$LOGS"/e2e-*  # a report left by an earlier call must not stand in for this one
    if [ ! -f target/gpu-check/e2e/model/model.safetensors.gz ]; then
        row "e2e run (wnut17 minilm 0.10)" "SKIP" "no e2e payload in target/gpu-check: scripts/gpu-check.sh --build [MODEL_DIR]"
        return 1
    fi
    [ -n "$CLI" ] || { row "e2e run (wnut17 minilm 0.10)" "MISSING" "no deepcut-fast binary"; return 1; }
    local E2E="$LOGS/e2e-unpacked"
    mkdir -p "$E2E/model" && cp target/gpu-check/e2e/model/* "$E2E/model/" && gunzip -f "$E2E/model/model.safetensors.gz"
    echo "== e2e: deepcut-fast run, WNUT17, ratio 0.10, bf16 on the GPU $(date -u +%H:%MZ)"
    # a self-check that is too strict for this card must not cost the measurement: the run
    # goes ahead without it (and says so), and the F1s against PyTorch below still judge it
    local skip=${DEEPCUT_SKIP_SELF_CHECK:-}
    if [ -z "$skip" ] && ! "$CLI" bench --device cuda --preset minilm-l6 --bf 1 --br 1 --seq-len 16 --steps 1 --warmup 0 \
        --matmul-size 256 >/dev/null 2>"$LOGS/e2e-selfcheck.log"; then
        echo "the self-check refused this GPU ($(grep -m1 'self-check' "$LOGS/e2e-selfcheck.log")); running without it"
        skip=1
    fi
    local limit
    limit=$(cap "$run_cap")
    DEEPCUT_SKIP_SELF_CHECK=$skip timeout "$limit" "$CLI" run --model "$E2E/model" --data target/gpu-check/e2e/data \
        --forget-ratio 0.10 --seed 0 --device cuda --precision bf16 --quiet --force --out "$LOGS/e2e-run" \
        ${DEEPCUT_E2E_ARGS:-} >"$LOGS/e2e-run.log" 2>&1
    rc=$?
    tail -n 12 "$LOGS/e2e-run.log"
    if [ ! -f "$LOGS/e2e-run/report.json" ]; then
        row "e2e run (wnut17 minilm 0.10)" "$([ "$rc" = 124 ] && echo TIMEOUT || echo FAIL)" "rc=$rc, no report in $limit s; $LOGS/e2e-run.log"
        return 1
    fi
    row "e2e run (wnut17 minilm 0.10)" "ok" "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); m=r["metrics"]; c=r["cost"]; ft=((r.get("original_training") or {}).get("record") or {}).get("seconds"); print("wall %.1f s%s, %s steps; F1 forget %.3f retain %.3f test %.3f" % (c.get("wall_seconds", float("nan")), " (%.1f s of it fine-tuning the original first)" % ft if ft else "", c.get("steps", "?"), m["forget"]["f1"], m["retain"]["f1"], m["test"]["f1"]))' "$LOGS/e2e-run/report.json" 2>/dev/null || echo "report unreadable")"
    if ! enough "e2e vs PyTorch"; then return 1; fi
    if ! python3 -c 'import torch, transformers' 2>/dev/null; then
        row "e2e vs PyTorch" "SKIP" "torch+transformers do not import"
        return 1
    fi
    replay_in_torch "e2e vs PyTorch" "$LOGS/e2e-run/report.json" "$LOGS/e2e-torch" "$torch_cap"
}

if [ "${1:-}" = "--e2e" ]; then
    # the end-to-end comparison alone (a second call, when the check's budget left it out)
    echo "== gpu-check --e2e $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1
    e2e 300 480
    printf '%s\n' "${ROWS[@]}" | tee "$LOGS/e2e-summary.txt"
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        cp "$LOGS/e2e-run.log" "$LOGS/e2e-torch.log" "$LOGS/e2e-torch.json" "$LOGS/e2e-summary.txt" "$OUT/" 2>/dev/null
        cp "$LOGS/e2e-run/report.json" "$OUT/e2e-run-report.json" 2>/dev/null
    fi
    echo "== gpu-check --e2e done ($(elapsed)); logs in $LOGS"
    exit 0
fi

if [ "${1:-}" = "--sanitize" ]; then
    # NVIDIA's compute-sanitizer over the kernel parity tests on the card: memcheck (every
    # device access inside its allocation), racecheck (shared-memory hazards), then, with
    # the time left, synccheck (barriers and warp syncs every thread must reach) and
    # initcheck (reads of device memory nothing wrote). The CPU emulator checks the same
    # tests for each in every CI (AddressSanitizer, ThreadSanitizer, its divergent-barrier
    # and shuffle checks, its NaN fill: tests/gpu_parity.rs); this is the real hardware's
    # word. The whole-step tests are skipped: they run the same kernels again, and a
    # sanitized step takes minutes.
    [ -n "$PARITY" ] || { echo "--sanitize: no gpu_parity binary: run scripts/gpu-check.sh --build" >&2; exit 1; }
    CS=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null | head -1)
    [ -n "$CS" ] || { echo "--sanitize: no compute-sanitizer on this machine" >&2; exit 1; }
    # Under gVisor (its kernel reports 4.4.0) compute-sanitizer refuses the device ("Device
    # not supported", then error 999: the device library's KINDS.md, 2026-11-04), so a run
    # there would only spend device time. DEEPCUT_SANITIZE_ANYWAY=1 tries regardless.
    if [ "$(uname -r)" = "4.4.0" ] && [ "${DEEPCUT_SANITIZE_ANYWAY:-0}" != 1 ]; then
        echo "--sanitize: this machine runs gVisor (kernel $(uname -r)), where compute-sanitizer refuses the device;" \
             "skipped (DEEPCUT_SANITIZE_ANYWAY=1 to try)" >&2
        exit 0
    fi
    echo "== gpu-check --sanitize $(date -u +%Y-%m-%dT%H:%MZ) with $CS"
    # Two passes of the four tools: every kernel test but infonce_every_option, then that
    # one alone. It runs the InfoNCE over every option and shape, which under racecheck took
    # the rest of a 200 s budget (2026-11-30, H200) and left the tests after it
    # (alphabetically) and the last two tools unrun; now they come first.
    for pass in rest infonce_every_option; do
        for tool in memcheck racecheck synccheck initcheck; do
            name="compute-sanitizer $tool"
            if [ "$pass" = rest ]; then
                filter=(--skip infonce_every_option)
            else
                filter=(infonce_every_option --exact)
                name="$name ($pass)"
            fi
            enough "$name" || continue
            log="$LOGS/sanitize-$tool-$pass.log"
            # (DEEPCUT_PARITY_SANITIZING=1: each GPU case once, not twice for the run-to-run
            # comparison; the tool judges every access of the first run)
            DEEPCUT_PARITY_SANITIZING=1 timeout "$(cap 240)" "$CS" --tool "$tool" --error-exitcode 3 --print-limit 20 \
                "$PARITY" --test-threads 1 --skip step:: --skip cuda_backend_ --skip sanitizers_ "${filter[@]}" \
                >"$log" 2>&1
            rc=$?
            summary=$(grep -E '(ERROR SUMMARY|RACECHECK SUMMARY)' "$log" | tail -1)
            tests=$(grep '^test result:' "$log" | tail -1)
            case $rc in
                0) row "$name" "PASS" "${summary:-no summary}; ${tests:-?}" ;;
                # 101: a parity test failed its own check; the sanitizer itself found nothing
                101) if echo "$summary" | grep -qE 'SUMMARY: 0 (errors|hazards)'; then
                         row "$name" "CLEAN" "$summary; parity tests that failed their own bounds: ${tests:-?}"
                     else
                         row "$name" "FAIL" "rc $rc; ${summary:-?}; $log"
                     fi ;;
                124) row "$name" "TIMEOUT" "$(grep -c '^test .* ok$' "$log") tests passed before the limit; $log" ;;
                *) row "$name" "FAIL" "rc $rc; ${summary:-?}; $log"
                   grep -m 20 -E '=========  (Invalid|Error|Race|.*hazard)' "$log" ;;
            esac
        done
    done
    printf '%s\n' "${ROWS[@]}" | tee "$LOGS/sanitize-summary.txt"
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        cp "$LOGS"/sanitize-*.log "$LOGS/sanitize-summary.txt" "$OUT/" 2>/dev/null
    fi
    exit 0
fi

# results of an earlier call (the machine keeps target/ between calls) must not stand in
# for this one's
rm -rf "$LOGS"/run-* "$LOGS"/compare-torch-* "$LOGS"/op-times-* "$LOGS"/*.log "$LOGS"/*.csv "$LOGS"/step.* "$LOGS"/e2e-* \
    "$LOGS"/replay-torch.json "$LOGS"/selfcheck-*.json "$LOGS"/cpu-bench-*.json
echo "== gpu-check $(date -u +%Y-%m-%dT%H:%MZ)"
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${GPU:-nvidia-smi not available}"
# the runtime decides what tools work there (gVisor: no compute-sanitizer, ncu or nsys report)
echo "kernel $(uname -r)$([ "$(uname -r)" = 4.4.0 ] && echo ' (gVisor)')"
[ -f "$LOGS/devices.txt" ] && cat "$LOGS/devices.txt"  # what the CLI opens: driver, cuBLAS, NVTX, kernels
command -v nvcc >/dev/null && nvcc --version | tail -1

# ---- 0. what the CLI opens ------------------------------------------------------------------------
if [ -z "$CLI" ]; then
    row "devices" "MISSING" "no deepcut-fast binary"
elif [ -s "$LOGS/devices.json" ]; then
    row "devices" "info" "$(python3 - "$LOGS/devices.json" <<'PY' 2>/dev/null || echo "unreadable: $LOGS/devices.json"
import json, os, sys
d = json.load(open(sys.argv[1])); c = d["cuda"]
name = lambda p: os.path.basename(p) if p else "none"
g = c["gpus"][0] if c["gpus"] else {}
print(f'driver CUDA {c["driver"]["cuda_version"]}; {name(c["cublas"]["library"])}'
      f'{" (linked)" if c["cublas"]["shim"] else ""}; NVTX {name(c["nvtx"])}; '
      f'GPU 0 {g.get("name", "none")}, kernels {g.get("kernel_image") or g.get("error") or c["why_not"]}'
      f'{", memory pools" if g.get("memory_pools") else ""}'
      f'{", memory by " + g["allocator"] + " (" + g["allocator_note"] + ")" if g.get("allocator_note") else ""}'
      f'{", pageable host copies (" + g["page_locked_note"] + ")" if g.get("page_locked_note") else ""}')
PY
)"
else
    row "devices" "FAIL" "$(tail -1 "$LOGS/devices.txt" 2>/dev/null)"
fi

# ---- 1. parity ---------------------------------------------------------------------------------
if [ -z "$PARITY" ]; then
    row "parity (tests/gpu_parity.rs)" "MISSING" "no gpu_parity binary: run scripts/gpu-check.sh --build on a Rust machine"
else
    echo "== parity: $PARITY"
    limit=$(cap 150)
    timeout "$limit" "$PARITY" --test-threads 1 --nocapture >"$LOGS/parity.log" 2>&1
    rc=$?
    tail -n 40 "$LOGS/parity.log"
    # libtest's last line: "test result: ok. 13 passed; 0 failed; ..."
    summary=$(grep '^test result:' "$LOGS/parity.log" | tail -1)
    pass=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$summary")
    fail=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$summary")
    pass=${pass:-0} fail=${fail:-?}
    worst=$(grep -o 'relative L2 [0-9.e+-]*' "$LOGS/parity.log" | awk '{print $3}' | sort -g | tail -1)
    if [ "$rc" = 0 ]; then
        row "parity (tests/gpu_parity.rs)" "PASS" "$pass tests, worst relative L2 ${worst:-n/a}"
    elif [ "$rc" = 124 ]; then
        row "parity (tests/gpu_parity.rs)" "TIMEOUT" "$pass passed before the $limit s limit; $LOGS/parity.log"
    else
        row "parity (tests/gpu_parity.rs)" "FAIL" "$pass passed, $fail failed; $LOGS/parity.log"
        grep -E 'panicked|relative L2 error|not bit-identical|DEEPCUT_REQUIRE_GPU' "$LOGS/parity.log" | head -20
    fi
    # which accumulation the tensor cores follow (tensor_core_products_keep_fp16_subnormal_inputs:
    # of 128 sums, how many each model of src/backend/cpu/mma_probe.rs gives bit for bit)
    for p in bf16 fp16; do
        acc=$(grep -o "tensor cores, $p accumulation, .*" "$LOGS/parity.log" | head -1 | sed 's/.*bit-identical to: //')
        [ -n "$acc" ] && row "tensor-core sums, $p (of 128)" "INFO" "$acc"
    done
fi

# ---- 2. throughput -------------------------------------------------------------------------------
if [ -z "$BENCH" ]; then
    row "bench (tests/gpu_bench.rs)" "MISSING" "no gpu_bench binary"
elif enough "bench (tests/gpu_bench.rs)"; then
    echo "== bench: $BENCH"
    timeout "$(cap 150)" "$BENCH" --ignored --test-threads 1 --nocapture >"$LOGS/bench.log" 2>&1
    rc=$?
    grep -E '^BENCH|SKIPPED|panicked' "$LOGS/bench.log"
    while read -r _ name value unit rest; do
        row "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "$value $unit $rest"
    done < <(grep '^BENCH' "$LOGS/bench.log")
    if [ "$rc" = 124 ]; then
        row "bench (tests/gpu_bench.rs)" "TIMEOUT" "not done in its limit; $LOGS/bench.log"
    elif [ "$rc" != 0 ] || ! grep -q '^BENCH' "$LOGS/bench.log"; then
        row "bench (tests/gpu_bench.rs)" "rc=$rc" "no BENCH output; $LOGS/bench.log"
    fi
fi

# ---- 3. PyTorch reference ----------------------------------------------------------------------
if ! enough "torch infonce"; then
    :
elif python3 -c 'import torch' 2>/dev/null; then
    echo "== PyTorch InfoNCE"
    timeout "$(cap 60)" python3 scripts/infonce_torch.py >"$LOGS/torch.log" 2>&1
    rc=$?
    cat "$LOGS/torch.log"
    while read -r _ name value rest; do
        row "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "$value $rest"
    done < <(grep '^BENCH' "$LOGS/torch.log")
    if [ "$rc" = 124 ]; then
        row "torch infonce" "TIMEOUT" "time limit; $LOGS/torch.log"
    elif ! grep -q '^BENCH' "$LOGS/torch.log"; then
        row "torch infonce" "rc=$rc" "$(tail -1 "$LOGS/torch.log")"
    fi
else
    row "torch infonce" "SKIP" "torch not importable"
fi

# ---- 4. a short DeepCUT run, GPU and CPU, same seed --------------------------------------------
# the CLI's own device self-check (src/cli/selfcheck.rs): does --device auto take this GPU?
if [ -n "$CLI" ] && enough "self-check"; then
    for prec in fp32 bf16; do
        timeout "$(cap 60)" "$CLI" bench --device auto --precision "$prec" --preset minilm-l6 --bf 1 --br 1 --seq-len 16 \
            --steps 1 --warmup 0 --matmul-size 256 >"$LOGS/selfcheck-$prec.json" 2>"$LOGS/selfcheck-$prec.log"
        res=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d.get("self_check") or "";
ok=d["backend"].startswith("cuda") and "passed" in c
print(("PASS " if ok else "FAIL ") + (c.split(": ", 1)[-1] if ok else d["backend"]))' "$LOGS/selfcheck-$prec.json" 2>/dev/null)
        [ -n "$res" ] || res="FAIL no bench JSON; $(grep -m1 -E 'self-check|device auto' "$LOGS/selfcheck-$prec.log")"
        row "self-check, --device auto ($prec)" "${res%% *}" "$(cut -c1-150 <<<"${res#* }")"
        [ "${res%% *}" = PASS ] || SELF_CHECK_FAILED=1
    done
    # a self-check too strict for this card must not cost the measurements below: they run
    # without it (bench then marks its JSON unverified), and the runs' F1 against the CPU
    # still judge correctness
    if [ -n "${SELF_CHECK_FAILED:-}" ]; then
        export DEEPCUT_SKIP_SELF_CHECK=1
        row "self-check skipped below" "info" "DEEPCUT_SKIP_SELF_CHECK=1 for the runs and benches (see the rows above)"
    fi
fi
: "${DEEPCUT_CHECK_MODEL:=tests/golden/roberta-wnut17}"
[ -d target/gpu-check/data ] && : "${DEEPCUT_CHECK_DATA:=target/gpu-check/data}"
if ! enough "deepcut run gpu vs cpu"; then
    :
elif [ -n "$CLI" ] && [ -n "${DEEPCUT_CHECK_MODEL:-}" ] && [ -n "${DEEPCUT_CHECK_DATA:-}" ] \
    && "$CLI" run --help 2>&1 | grep -q 'cuda'; then
    for prec in fp32 bf16; do
        for dev in cuda cpu; do
            enough "deepcut run --device $dev --precision $prec" || continue
            limit=$(cap 100)
            timeout "$limit" "$CLI" run --model "$DEEPCUT_CHECK_MODEL" --data "$DEEPCUT_CHECK_DATA" --forget-ratio 0.01 \
                --steps 6 --seed 0 --device "$dev" --precision "$prec" --quiet --force --out "$LOGS/run-$dev-$prec" \
                >"$LOGS/run-$dev-$prec.log" 2>&1
            rc=$?
            # a run cut off by its time limit is told apart from one that failed (the CPU
            # emulator of the driver, for one, is too slow for the fp32 run's limit)
            if [ "$rc" = 124 ]; then
                row "deepcut run --device $dev --precision $prec" "TIMEOUT" "not done in $limit s; $LOGS/run-$dev-$prec.log"
            elif [ "$rc" != 0 ]; then
                row "deepcut run --device $dev --precision $prec" "FAIL" "rc=$rc: $(tail -1 "$LOGS/run-$dev-$prec.log"); $LOGS/run-$dev-$prec.log"
            fi
        done
        if [ ! -f "$LOGS/run-cuda-$prec/report.json" ] || [ ! -f "$LOGS/run-cpu-$prec/report.json" ]; then
            row "deepcut run gpu vs cpu ($prec, 6 steps)" "NOT RUN" "a run failed or was skipped (rows above)"
            continue
        fi
        cmp=$(python3 - "$LOGS/run-cuda-$prec/report.json" "$LOGS/run-cpu-$prec/report.json" <<'EOF' 2>&1
import json, sys
g, c = (json.load(open(p))["metrics"] for p in sys.argv[1:3])
gaps = {s: abs(g[s]["f1"] - c[s]["f1"]) * 100 for s in ("forget", "retain", "dev", "test") if s in g and s in c}
print(("PASS" if max(gaps.values()) <= 1.0 else "FAIL") + " F1 gap (points) " + " ".join(f"{k} {v:.2f}" for k, v in gaps.items()))
EOF
)
        case "$cmp" in
            PASS*|FAIL*) row "deepcut run gpu vs cpu ($prec, 6 steps)" "${cmp%% *}" "${cmp#* }" ;;
            *) row "deepcut run gpu vs cpu ($prec, 6 steps)" "FAIL" "no comparison: $(tail -1 <<<"$cmp")" ;;
        esac
    done
else
    row "deepcut run gpu vs cpu" "NOT RUN" "needs the CLI wired to CUDA and DEEPCUT_CHECK_MODEL/DATA"
fi

# ---- 4b. the same run replayed in PyTorch on the GPU (issue #6's end-to-end comparison) ---------
# scripts/deepcut-torch.py reads the bf16 GPU run's report.json and does the same work with
# transformers (reference evaluation, as many DeepCUT steps, the stopping-rule checks, final
# evaluation): wall clock per phase and F1 side by side. With the small check model this mostly
# times fixed costs and checks the replay itself; issue #6's run is step 8 (any run can be
# replayed: scripts/deepcut-torch.py --report R).
if ! enough "run end to end vs PyTorch"; then
    :
elif [ -f "$LOGS/run-cuda-bf16/report.json" ] && python3 -c 'import torch, transformers' 2>/dev/null; then
    echo "== deepcut-torch (the bf16 GPU run, replayed in PyTorch)"
    replay_in_torch "run end to end vs PyTorch (bf16)" "$LOGS/run-cuda-bf16/report.json" "$LOGS/replay-torch" 120
else
    row "run end to end vs PyTorch" "SKIP" "needs the bf16 GPU run and torch+transformers"
fi

# ---- 5. DeepCUT step throughput against PyTorch (issue #6's comparison) -------------------------
# `deepcut-fast bench --precision bf16` (GEMMs on tensor cores, buffers fp32) and the same step
# in PyTorch (bf16 autocast, SDPA) at the roberta-base shape, seq 128, bf 8 / br 32 and
# bf 32 / br 128 (the issue's two goals).
if ! enough "step vs PyTorch"; then
    :
elif [ -n "$CLI" ] && python3 -c 'import torch, transformers' 2>/dev/null; then
    for shape in "8 32 10 3" "32 128 5 2"; do
        read -r bf br steps warm <<<"$shape"
        enough "step vs PyTorch roberta $bf/$br" || continue
        echo "== compare-torch (roberta-base, $bf/$br/128, bf16)"
        timeout "$(cap 120)" python3 scripts/compare-torch.py --device cuda --precision bf16 --preset roberta-base --bf "$bf" \
            --br "$br" --seq-len 128 --steps "$steps" --warmup "$warm" --bin "$CLI" \
            --json "$LOGS/compare-torch-$bf-$br.json" >"$LOGS/compare-torch-$bf-$br.log" 2>&1
        rc=$?
        tail -n 12 "$LOGS/compare-torch-$bf-$br.log"
        res=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); o=d.get("ours",d); c=o.get("device_calls_per_step") or {}; print(round(d.get("ratio",float("nan")),2), round(100*o.get("mfu",float("nan")),1), round(100*o.get("host_enqueue_fraction",float("nan"))), "%s+%s" % (c.get("kernel_launches","?"), c.get("gemms","?")))' "$LOGS/compare-torch-$bf-$br.json" 2>/dev/null)
        [ -n "$res" ] || res="? ? ? ?"
        read -r r_ratio r_mfu r_host r_calls <<<"$res"
        row "step vs PyTorch roberta $bf/$br" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "ratio ours/torch $r_ratio, MFU $r_mfu%, host enqueue $r_host% of the step ($r_calls launches+GEMMs); $LOGS/compare-torch-$bf-$br.log"
    done
else
    row "step vs PyTorch" "SKIP" "needs the CLI and torch+transformers"
fi

# ---- 5b. where the step's time goes: device time per op (bench --op-times) ----------------------
# CUDA events around every op and phase range of the bench's timed steps (src/backend/cuda/
# optimes.rs): the profile without Nsight (not installed on the lent machines so far). A run of
# its own, as each range's two event records cost host time the comparison above should not pay.
if ! enough "op times"; then
    :
elif [ -n "$CLI" ]; then
    # the issue's two roberta-base shapes, and MiniLM at 8/32 with sequences of 32 tokens, the
    # unlearning run's shape (WNUT17's sentences are ~30 tokens: its steps are small ones)
    for shape in "roberta-base 8 32 128" "roberta-base 32 128 128" "minilm-l6 8 32 32"; do
        read -r preset bf br len <<<"$shape"
        tag="${preset%%-*} $bf/$br/$len"
        file="op-times-${preset%%-*}-$bf-$br-$len"
        enough "op times $tag" || continue
        echo "== op times ($preset, $bf/$br/$len, bf16, 3 steps)"
        timeout "$(cap 90)" "$CLI" bench --device cuda --precision bf16 --preset "$preset" --bf "$bf" --br "$br" \
            --seq-len "$len" --steps 3 --warmup 2 --matmul-size 4096 --op-times >"$LOGS/$file.json" \
            2>"$LOGS/$file.log"
        rc=$?
        grep -A 16 "op times per step" "$LOGS/$file.log"
        # the five ops that take the most device time (not those inside another op's range)
        top=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
ops = sorted((o for o in d["op_times"]["ops"] if not o["inside_another_op"]), key=lambda o: -o["ms_per_step"])
print("; ".join("%s %.2f ms" % (o["name"], o["ms_per_step"]) for o in ops[:5]),
      "(step %.1f ms)" % (1e3 * d["step_time_s"]["median"]))' "$LOGS/$file.json" 2>/dev/null)
        row "op times $tag" "$([ "$rc" = 0 ] && [ -n "$top" ] && echo ok || echo "rc=$rc")" "${top:-no op_times}; $LOGS/$file.json"
    done
else
    row "op times" "SKIP" "needs the CLI"
fi

# ---- 6. NVTX ranges under Nsight Systems (issue #5 item 6) ---------------------------------------
# Three bench steps under nsys; the NVTX summary should list forward / layer N fwd / backward /
# loss / optimizer ranges. The report lands in $LOGS/step.nsys-rep for a closer look.
# nsys: $DEEPCUT_NSYS, else the one on PATH. (Not searched for elsewhere: the copy some images
# keep inside Nsight Compute could not make a report on gVisor machines, and would spend the
# check's minutes.) Which NVTX library the ranges go through is in the bench JSON (paths.nvtx).
NSYS=${DEEPCUT_NSYS:-$(command -v nsys)}
NVTX_LIB=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print((d.get("ours",d).get("paths") or {}).get("nvtx"))' \
    "$LOGS/compare-torch-8-32.json" 2>/dev/null)
if ! enough "nsys NVTX ranges"; then
    :
elif [ -n "$CLI" ] && [ -n "$NSYS" ]; then
    echo "== nsys (minilm-l6 bench, 3 steps; $NSYS; NVTX library ${NVTX_LIB:-unknown})"
    timeout "$(cap 90)" "$NSYS" profile --trace=cuda,nvtx --force-overwrite=true -o "$LOGS/step" "$CLI" bench --preset minilm-l6 \
        --steps 3 --warmup 1 --device cuda --precision bf16 --matmul-size 1024 >"$LOGS/nsys.log" 2>&1
    rc=$?
    timeout "$(cap 60)" "$NSYS" stats --report nvtx_sum --format csv --output - "$LOGS/step.nsys-rep" >"$LOGS/nvtx.csv" 2>>"$LOGS/nsys.log"
    head -n 25 "$LOGS/nvtx.csv"
    ranges=$(grep -cE 'layer [0-9]+ (fwd|bwd)|optimizer: (clip \+ )?adamw|loss: infonce' "$LOGS/nvtx.csv")
    row "nsys NVTX ranges" "$([ "$rc" = 0 ] && [ "$ranges" -gt 0 ] && echo ok || echo "rc=$rc")" "$ranges named layer/loss/optimizer ranges (NVTX library ${NVTX_LIB:-unknown}); $LOGS/nvtx.csv"
    # where the host waited (the steps themselves should not: issue #6); the bench's GEMM-rate
    # measurement and its final read-backs synchronise too, so this is an upper bound
    timeout "$(cap 60)" "$NSYS" stats --report cuda_api_sum --format csv --output - "$LOGS/step.nsys-rep" >"$LOGS/cuda-api.csv" 2>>"$LOGS/nsys.log"
    waits=$(grep -E 'Synchronize|MemcpyDtoH_v2|MemcpyHtoD_v2' "$LOGS/cuda-api.csv" | awk -F, '{gsub(/"/,""); printf "%s %s; ", $NF, $3}')
    row "nsys host waits (5 steps + bench)" "info" "${waits:-none}; $LOGS/cuda-api.csv"
else
    row "nsys NVTX ranges" "SKIP" "no nsys found; the bench's NVTX library: ${NVTX_LIB:-unknown}"
fi

# ---- 8. issue #6's unlearning run end to end, on the GPU and in PyTorch on the same GPU -----------
# (the function e2e above; SKIP without the payload that --build packs).
# It takes whatever the budget has left, up to 150 s for the run and 240 s for PyTorch; with
# the default budget that is usually too little, and a second call (`--e2e`) runs it alone.
if enough "e2e run (wnut17 minilm 0.10)"; then
    e2e 150 240
fi

# ---- 7. the CPU backend on this machine's cores (issue #6 item 5; last: the least telling) -------
# The CPU GEMM library is picked per machine (src/backend/cpu/gemm.rs kernel()):
# matrixmultiply where the CPU has AVX-512 (its AVX-512 kernel; it threads a GEMM over at
# most 4 cores, so above 4 threads the model GEMMs are split by rows over every thread),
# the `gemm` crate elsewhere (AVX2 kernels on a stable compiler). The MiniLM step at 4
# threads and at all of them, with each library forced (DEEPCUT_CPU_GEMM), says whether
# that choice holds on a many-core AVX-512 host; the row names the one picked by default.
if ! enough "cpu step, 4 vs all threads"; then
    :
elif [ -n "$CLI" ]; then
    all=$(nproc)
    res=""
    for t in 4 "$all"; do
        res+="$t threads:"
        for lib in matrixmultiply gemm; do
            enough "cpu step ($lib, $t threads)" || break
            DEEPCUT_CPU_GEMM=$lib timeout "$(cap 60)" "$CLI" bench --device cpu --threads "$t" --preset minilm-l6 \
                --bf 8 --br 32 --seq-len 128 --steps 3 --warmup 1 --matmul-size 1024 \
                >"$LOGS/cpu-bench-$t-$lib.json" 2>"$LOGS/cpu-bench-$t-$lib.log"
            res+=" $lib $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.3f s/step (%d tokens/s, %s)" % (d["step_time_s"]["median"], d["tokens_per_s"], d["paths"]["simd"]))' "$LOGS/cpu-bench-$t-$lib.json" 2>/dev/null || echo "failed, $LOGS/cpu-bench-$t-$lib.log");"
        done
        res+=" "
    done
    picked=$("$CLI" devices --no-self-check --json - 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["cpu"]["gemm"])' 2>/dev/null || echo "?")
    row "cpu step minilm 8/32/128 fp32" "info" "default GEMM here: $picked; $res"
fi

echo
echo "== gpu-check summary ($(elapsed), ${GPU:-unknown GPU})"
printf '%-34s | %-8s | %s\n' "check" "status" "detail"
printf '%s\n' "-----------------------------------+----------+------------------------------------------"
printf '%s\n' "${ROWS[@]}"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    {
        echo "== gpu-check summary ($(elapsed), ${GPU:-unknown GPU})"
        printf '%s\n' "${ROWS[@]}"
    } >"$OUT/summary.txt"
    tar czf "$OUT/gpu-check-logs.tgz" --exclude='*.nsys-rep' --exclude='*.sqlite' --exclude='libshim' \
        --exclude='*.safetensors' --exclude='e2e-unpacked' -C "$LOGS" . 2>/dev/null
    echo "logs: \$OUT/gpu-check-logs.tgz, table: \$OUT/summary.txt"
fi
