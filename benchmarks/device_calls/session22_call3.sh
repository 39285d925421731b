#!/usr/bin/env bash
# Session 22, device call 3 (one GPU, <= 9.5 min; carry .whl and .whl_train): the 130m training step with
# the kernels (12 unrolled layers, L = 3) beside the XLA chunk form, lowered / compiled / first step printed
# as each ends (XLA's compile log in $OUT/train_step.log); then the 16-bit dq / dk sums on today's chunk
# backward at L = 3 and 2 beside the default, in what is left.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl_train .whl
XLA_FLAGS="--xla_gpu_print_compilation_stats" TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE="gpu_compiler=3,nvptx_compiler=3" \
timeout ${TRAIN_S:-300} python3 benchmarks/train_step.py --preset 130m --steps 5 --out "$OUT/train_step_unrolled.json" \
    --budget-s 200 --variant "default=pallas" --variant "chunk=chunk" > "$OUT/train_step.log" 2>&1
echo "train_step rc=$?"; grep "^#\|^|" "$OUT/train_step.log"; grep -i "ptxas\|took\|lowered\|compiled\|first step" "$OUT/train_step.log" | tail -12 | cut -c1-250
mkdir -p "$OUT/rows"
A='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"dqk_sum": "add16"}}}'
left=$((${END_S:-560} - SECONDS))
echo "# kernels: ${left} s left"
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 20)) --keep_output \
    --variant "a16=$A" --plan a16:3:2048,mosaic:3:2048,a16:2:2048,mosaic:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
