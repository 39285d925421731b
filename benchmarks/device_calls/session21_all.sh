#!/usr/bin/env bash
# Session 21's open device work in one call (one GPU, <= 9.8 min): `session21_call1.sh` (why the 130m
# training step with the kernels does not finish compiling: the op at one layer's shape and the step,
# phase by phase), then, in what is left of the call, L = 3 and L = 2 with fused outputs (the intra
# kernel's factors, which now also brings the 16-bit inverses) beside today's default, whole op fwd+bwd.
# Carry .whl and .whl_train.
bash benchmarks/device_calls/session21_call1.sh
source benchmarks/device_calls/setup.sh .whl > /dev/null
mkdir -p "$OUT/rows"
left=$((${END_S:-575} - SECONDS))
echo "# kernels: ${left} s left"
F='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"outputs": {"fused": true}}}'
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 60)) --keep_output \
    --variant "fused=$F" --plan mosaic:3:2048,fused:3:2048,fused:2:2048,mosaic:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
