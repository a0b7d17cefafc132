#!/usr/bin/env bash
# The CUDA paths that CI cannot run (it has no GPU). Run it on a CUDA machine after changing model/,
# trainer/ or generation; about 7 minutes on one H100:
#
#     bash scripts/cuda_check.sh [LOG_DIR [WORK_DIR]]
#
# LOG_DIR (default out/cuda_check) gets one log per step and bench.json; WORK_DIR (default LOG_DIR) the
# weights and metrics of the training runs.
#
#   tests       the suite's CUDA tests (fp16/bf16 generation) and the generation tests
#   ddp         torchrun (NCCL) pretraining, bf16 autocast, torch.compile; stopped by SIGTERM mid-run,
#               resumed with --from_resume 1, then compared with the same run left uninterrupted
#   fp16        SFT from those weights with float16 autocast + GradScaler
#   quickstart  scripts/quickstart.py end to end on the GPU (bf16 training and inference)
#   quickstart_cpu_eval  its weights scored again on the CPU in fp32 (the weights are copied to LOG_DIR)
#   bench_scores  its weights scored on CUDA by eval_vlm.py --bench: both methods, images and blanked
#   bench       scripts/bench.py: the training step (fp32) and decode (batch 1), stock vs ours
# Every step runs even if one before it failed; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=$(realpath -m "${1:-out/cuda_check}")
WORK=$(realpath -m "${2:-$LOG}")
mkdir -p "$LOG" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
failed=()

step() {  # step NAME CMD...: run, log to $LOG/NAME.log, print the log's end
    local name=$1 t=$SECONDS rc
    shift
    echo "=== $name"
    "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    tail -n 12 "$LOG/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

$PY - <<'EOF' | tee "$LOG/device.txt"
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"transformers {transformers.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

step tests timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_model.py tests/test_model_vlm.py

# Also makes the synthetic task and the tiny CLIP stand-in that the training checks below use.
# MODEL: the quickstart's model (hidden 128 x 4, the project's tokenizer, the tiny CLIP stand-in).
MODEL=(--hidden_size 128 --num_hidden_layers 4 --tokenizer_path model/tokenizer
       --vision_model_path model/vision_model/clip-tiny-random)
step quickstart timeout 300 $PY scripts/quickstart.py --out "$WORK/quickstart"
# The same GPU-trained weights scored on the CPU in fp32: if the GPU's score differs from a CPU run's, this
# tells training from inference (an H100 scored 0.80 against the CPUs' 0.92; README, Results).
step quickstart_cpu_eval timeout 300 $PY eval_vlm.py "${MODEL[@]}" --weight sft_vlm --save_dir "$WORK/quickstart" \
    --bench dataset/synthetic/eval.parquet --bench_out "$LOG/quickstart_cpu_eval.json" --temperature 0 --device cpu
cp "$WORK/quickstart/sft_vlm_128.pth" "$LOG/" 2>/dev/null
# Benchmark scoring on CUDA (bf16): generation and batched option log-likelihood, images and blanked.
step bench_scores timeout 300 $PY eval_vlm.py "${MODEL[@]}" --weight sft_vlm --save_dir "$WORK/quickstart" \
    --bench dataset/synthetic/eval.parquet --bench_out "$LOG/bench_scores.json" --bench_limit 200

FLAGS=("${MODEL[@]}" --num_workers 4 --log_interval 5)
DDP=(timeout 150 torchrun --standalone --nproc_per_node 1 trainer/train_pretrain_vlm.py "${FLAGS[@]}"
     --data_path dataset/synthetic/pretrain.parquet --from_weight none --freeze_llm 0 --learning_rate 1e-3
     --batch_size 16 --epochs 1 --max_steps 60 --save_interval 10 --use_compile 1 --dtype bfloat16)
ddp_check() {
    rm -rf "$WORK/whole" "$WORK/broken"
    "${DDP[@]}" --save_dir "$WORK/whole" || return 1
    "${DDP[@]}" --save_dir "$WORK/broken" &  # timeout passes the SIGTERM below on to torchrun
    local pid=$!
    until [ -f "$WORK/broken/pretrain_vlm_128_resume.pth" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
    kill -TERM $pid
    wait $pid
    "${DDP[@]}" --save_dir "$WORK/broken" --from_resume 1 || return 1
    $PY - "$WORK" <<'EOF'
import json, sys, torch
from pathlib import Path
log = Path(sys.argv[1])
def last_loss(d):
    lines = (log / d / "pretrain_vlm_128_metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "summary" not in r][-1]["loss"]
a, b = (torch.load(log / d / "pretrain_vlm_128.pth") for d in ("whole", "broken"))
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
loss = [last_loss(d) for d in ("whole", "broken")]
print(f"uninterrupted vs stopped (SIGTERM) + resumed: final loss {loss[0]:.4f} vs {loss[1]:.4f}, "
      f"max weight difference {diff:.2e}")
# bf16 autocast and CUDA's non-deterministic embedding backward: close, not bitwise.
assert abs(loss[0] - loss[1]) < 0.05 * loss[0] and diff < 5e-2, "resume diverged"
EOF
}
step ddp ddp_check

step fp16 timeout 150 $PY trainer/train_sft_vlm.py "${FLAGS[@]}" --save_dir "$WORK/whole" \
    --data_path dataset/synthetic/sft.parquet --from_weight pretrain_vlm --batch_size 16 --max_steps 30 --dtype float16

CLIP=$PWD/model/vision_model/clip-vit-base-patch16-random   # the real geometry, random weights
step bench timeout 300 bash -c "$PY -c 'from scripts.make_tiny_clip import make_clip; make_clip(\"$CLIP\", full=True)' &&
    $PY scripts/bench.py --parts train,decode --device cuda --vision_model_path $CLIP --steps 5 --warmup 2 --repeats 5 \
        --out $LOG/bench.json"

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all CUDA checks passed"
