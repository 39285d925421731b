#!/usr/bin/env bash
# Session 22, device call 4 (<= 4.5 min; carry .whl and .whl_train): the 130m training step in the XLA chunk
# form alone (call 3's ran out of time after its compile), then L = 2 with 16-bit dq / dk sums beside the
# default if time is left.
source benchmarks/device_calls/setup.sh .whl_train .whl > /dev/null
timeout ${TRAIN_S:-150} python3 benchmarks/train_step.py --preset 130m --steps 5 --out "$OUT/train_step_chunk.json" \
    --budget-s 140 --variant "chunk=chunk" 2>&1 | grep "^#\|^|"
mkdir -p "$OUT/rows"
A='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"dqk_sum": "add16"}}}'
left=$((${END_S:-260} - SECONDS))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 10)) --keep_output \
    --variant "a16=$A" --plan a16:2:2048,mosaic:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
