#!/usr/bin/env bash
# Session 23, device call 1 (one GPU, <= 9.7 min; carry .whl and .whl_train): the 130m training step with the
# kernels beside the XLA chunk form (the init now traced on 64 tokens); then the whole op: L = 2 with 16-bit
# dq / dk sums on the work split beside the default, L = 1 beside the peer; the GPU tests of the 16-bit sums
# against float64; the chunk backward's per-phase profile at L = 1 and 2.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl_train .whl
timeout ${TRAIN_S:-250} python3 benchmarks/train_step.py --preset 130m --steps 5 --out "$OUT/train_step_130m.json" \
    --variant "default=pallas" --variant "chunk=chunk" > "$OUT/train_step.log" 2>&1
echo "train_step rc=$? at ${SECONDS}s"; grep "^#\|^|" "$OUT/train_step.log" | cut -c1-250
mkdir -p "$OUT/rows"
A='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"dqk_sum": "add16"}}}'
left=$((${END_S:-575} - SECONDS - 150))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 30)) --keep_output \
    --variant "a16=$A" --plan a16:2:2048,mosaic:2:2048,jla_gdn:2048,mosaic:1:2048,a16:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
timeout 75 python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "test_gpu_matches_float64_reference and add16" -p no:cacheprovider 2>&1 | tail -4
echo "tests at ${SECONDS}s"
left=$((${END_S:-575} - SECONDS))
timeout $left python3 benchmarks/mosaic_diag.py profile --writes 1,2 --out "$OUT/profile" 2>&1 | grep -v '^\s*$' | tail -60
