#!/usr/bin/env bash
# Session 22, device call 2 (one GPU, <= 9.5 min; carry .whl): the value blocks' dq / dk shares added in
# 16 bits (`mosaic_options={"grads": {"dqk_sum": "add16"}}`: no float32 zeroing, no cast of dq / dk in XLA)
# and fused outputs, each beside today's default at L = 2 and L = 3 (whole op fwd+bwd, output kept, in one
# process), then the GPU tests of add16 against float64 in what is left.
source benchmarks/device_calls/setup.sh .whl > /dev/null
mkdir -p "$OUT/rows"
A='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"dqk_sum": "add16"}}}'
F='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"outputs": {"fused": true}}}'
left=$((${END_S:-540} - SECONDS - 100))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 40)) --keep_output \
    --variant "a16=$A" --variant "fused=$F" \
    --plan mosaic:2:2048,a16:2:2048,fused:2:2048,mosaic:3:2048,a16:3:2048,fused:3:2048,a16:2:2048,mosaic:2:2048,jla_gdn:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
left=$((${END_S:-540} - SECONDS))
timeout $left python3 -m pytest -q -x -m gpu tests/kernels/mosaic/test_chunk_grads.py -k "add16" -p no:cacheprovider 2>&1 | tail -5
