#!/usr/bin/env bash
# What one short GPU session measures, in at most 480 s of wall time on one H100/H200 (a 15-minute loan
# then leaves room for a cut-down rerun: SEEDS="0" BUDGET=300). Run from anywhere in the repo; needs no
# install (PYTHONPATH):
#
#     bash scripts/gpu_measure.sh LOG_DIR           # on the GPU machine
#     DRY=1 bash scripts/gpu_measure.sh LOG_DIR     # the same steps on the CPU at toy sizes: checks the plumbing
#
# LOG_DIR gets summary.txt (every figure; also printed at the end) and logs.tgz (each step's log and
# JSON, each seed's scores and metrics; the weights stay behind, the tarball must stay small to come
# back). The work (data, weights) goes to WORK
# (default /tmp/gpu_measure); SEEDS (default "0 1 2") picks the quickstart seeds. Python: $PYTHON, else
# the first of python3 and /opt/torch/.venv/bin/python3 whose torch sees CUDA (DRY: whose torch imports). If its transformers is older than the project's
# 5.21 and a wheel lies in .whl/, that wheel is installed into /tmp/site first (no network needed).
#
# Steps, in priority order; each under its own timeout and all under one deadline (BUDGET, default 470 s),
# so a slow step costs the later ones their time, never the total. One failing does not stop the rest.
#   prep         the synthetic task, the tiny CLIP stand-in (and the full-geometry one in the background) ~15 s
#   quickstart   scripts/quickstart.py --seed 0, 1, 2 at once on the one GPU (bf16 training and scoring),
#                each seed's SFT weights then scored again on the CPU in fp32; until BUDGET - 110 s
#                (one seed alone took 160 s on an H100; three at once: not measured yet)
#   compare      beside them: scripts/compare_devices.py, CPU fp32 vs this GPU from the same start over
#                the same 30 SFT batches, one numerical knob at a time                  ~60 s, at most 200
#   bench_pretrain  scripts/bench.py --dtype bfloat16, published pretrain shape (512 x 8, batch 16,
#                max_seq_len 640), real ViT-B/16 geometry (random weights), 4 modes      ~30 s, at most 55
#   bench_sft    the same at SFT's shape (batch 4, max_seq_len 1536, whole LM trained)    ~30 s, at most 40
#   summary      scripts/gpu_summary.py: LOG_DIR/summary.txt, with the hours the published recipe
#                would take on this GPU                                                          ~5 s
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DRY=${DRY:-0}
BUDGET=${BUDGET:-$([ "$DRY" = 1 ] && echo 1800 || echo 470)}
LOG=$(realpath -m "${1:-out/gpu_measure}")
WORK=$(realpath -m "${WORK:-/tmp/gpu_measure}")
L=$WORK/logs   # step logs, bundled into $LOG/logs.tgz at the end (the device returns few files)
DATA=$WORK/data
rm -rf "$WORK" && mkdir -p "$LOG" "$L" "$DATA"

pick_python() {  # the first candidate whose torch sees CUDA (DRY: imports at all)
    local test="import torch, sys; sys.exit(0 if torch.cuda.is_available() or $DRY == 1 else 1)"
    for py in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3; do
        if command -v "$py" >/dev/null && "$py" -c "$test" 2>/dev/null; then echo "$py"; return; fi
    done
    return 1
}
PY=$(pick_python) || { echo "no python with a CUDA torch (set PYTHON=...)"; exit 1; }
if ! $PY -c 'import sys, transformers; from packaging.version import Version as V; sys.exit(V(transformers.__version__) < V("5.21"))' \
        && ls .whl/transformers-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/transformers-*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
$PY - "$DRY" <<'EOF' | tee "$L/device.txt"
import os, sys, torch, transformers
if torch.cuda.is_available() and sys.argv[1] != "1":
    p = torch.cuda.get_device_properties(0)
    dev = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"
else:
    dev = "CPU (DRY=1: toy sizes, figures mean nothing)"
print(f"{dev}, {os.cpu_count()} host cores, python {sys.executable}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF

step() {  # step NAME SECONDS CMD...: run under a timeout that also respects the deadline; log to $L/NAME.log
    local name=$1 want=$2 t=$SECONDS rc
    shift 2
    local left=$((BUDGET - 15 - SECONDS))   # 15 s kept for the summary and the bundle
    local limit=$((want < left ? want : left))
    if [ "$limit" -lt 5 ]; then echo "=== $name: skipped, out of time"; printf '%s\tskipped\t0\n' "$name" >>"$L/steps.tsv"; return 1; fi
    echo "=== $name (at most $limit s)"
    timeout -k 5 "$limit" "$@" >"$L/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t))" >>"$L/steps.tsv"
    grep -v -e 'it/s]' -e 'row/s]' "$L/$name.log" | tail -n 8
    echo "=== $name: exit $rc after $((SECONDS - t)) s"
    return $rc
}

bundle() {  # the step logs and each seed's results into $LOG/logs.tgz, then the summary
    for d in "$WORK"/qs*; do
        [ -d "$d" ] && mkdir -p "$L/$(basename "$d")" && cp "$d"/*.json "$d"/*metrics.jsonl "$L/$(basename "$d")/" 2>/dev/null
    done
    $PY scripts/gpu_summary.py "$L" "$WORK" "${SEEDS// /,}" >"$LOG/summary.txt" 2>"$L/summary.err"
    cp "$LOG/summary.txt" "$L/"
    tar -czf "$LOG/logs.tgz" -C "$WORK" logs
    echo; cat "$LOG/summary.txt"
}
trap bundle EXIT

TINY=model/vision_model/clip-tiny-random
FULL=model/vision_model/clip-vit-base-patch16-random   # the real ViT-B/16 geometry, random weights
if [ "$DRY" = 1 ]; then
    SEEDS=${SEEDS:-0 1}; SMOKE=(--smoke); LIMIT=(--bench_limit 16)
    CMP=(--device cpu --steps 2 --batch_size 4 --variants strict,torch_default,bf16_autocast)
    BENCH=(--device cpu --hidden_size 64 --num_hidden_layers 2 --steps 1 --warmup 1 --vision_model_path "$TINY")
    BENCH_PRE=(--batch_size 4); BENCH_CLIP=$TINY
else
    SEEDS=${SEEDS:-0 1 2}; SMOKE=(); LIMIT=()
    CMP=(--device cuda --steps 30)
    BENCH=(--device cuda --steps 5 --warmup 2 --vision_model_path "$FULL")
    BENCH_PRE=(); BENCH_CLIP=$FULL
fi

# prep: what the concurrent steps share, made once before them (so they never race to write it).
step prep 60 $PY scripts/make_synthetic_data.py --out "$DATA" --seed 0 --n_pretrain 4000 --n_sft 6000 --n_eval 400 \
    --eval_kinds colour,horizontal,vertical,two_images
step clip_tiny 60 $PY -c "from scripts.make_tiny_clip import make_clip; make_clip('$TINY')"
step clip_full 90 $PY -c "from scripts.make_tiny_clip import make_clip; make_clip('$BENCH_CLIP', full=True)" &
clip_pid=$!

# quickstart: three seeds at once. The GPU is mostly idle under one such tiny run (launch-bound), so three
# share it with little loss; threads are split so the 16 host cores are not oversubscribed.
QUICK_END=$((BUDGET - 110))   # the rest goes to the two benches (55 + 40 s) and the summary (15 s)
MODEL=(--hidden_size 128 --num_hidden_layers 4 --tokenizer_path model/tokenizer --vision_model_path "$TINY")
seed_run() {  # seed_run N: the quickstart on the GPU, then its SFT weights scored on the CPU in fp32
    local n=$1 eval_s=45   # the CPU scoring: about 20 s on 4 threads
    OMP_NUM_THREADS=3 step "qs$n" $((QUICK_END - eval_s - SECONDS)) $PY scripts/quickstart.py --seed "$n" \
        --out "$WORK/qs$n" --data "$DATA" "${SMOKE[@]}" || return
    OMP_NUM_THREADS=4 step "qs${n}_cpu_eval" $((QUICK_END - SECONDS)) $PY eval_vlm.py "${MODEL[@]}" --weight sft_vlm \
        --save_dir "$WORK/qs$n" --bench "$DATA/eval.parquet" --bench_out "$L/qs${n}_cpu_eval.json" --temperature 0 \
        --bench_method generate --bench_baseline 0 --device cpu --dtype float32 "${LIMIT[@]}"
}
pids=()
for n in $SEEDS; do seed_run "$n" & pids+=($!); done
OMP_NUM_THREADS=4 step compare 200 $PY scripts/compare_devices.py --data_path "$DATA/sft.parquet" "${CMP[@]}" \
    --out "$L/compare.json" & pids+=($!)
wait "${pids[@]}" "$clip_pid"

# bench: alone on the machine (timings), bf16 autocast as the trainer runs on CUDA.
step bench_pretrain 55 $PY scripts/bench.py --parts train --dtype bfloat16 "${BENCH[@]}" "${BENCH_PRE[@]}" \
    --out "$L/bench_pretrain.json"
step bench_sft 40 $PY scripts/bench.py --parts train --dtype bfloat16 "${BENCH[@]}" --batch_size 4 --max_seq_len 1536 \
    --freeze_llm 0 --data_path "$DATA/sft.parquet" --out "$L/bench_sft.json"
