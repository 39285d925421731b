#!/usr/bin/env bash
# Session 23, device call 2 (one GPU, <= 9.7 min; carry .whl and .whl_train): the 130m training step with the
# kernels beside the XLA chunk form, the fresh state made on the host (config.init_on "auto"); the whole op at
# L = 1, 2, 3 (16-bit dq / dk sums now the default at L = 2) beside the peer, and the three-warpgroup chunk
# backward at L = 2 with 64 value columns (fits with 16-bit sums); then the SASS size of our kernels and the peer's.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl_train .whl
timeout ${TRAIN_S:-230} python3 benchmarks/train_step.py --preset 130m --steps 5 --out "$OUT/train_step_130m.json" \
    --variant "default=pallas" --variant "chunk=chunk" > "$OUT/train_step.log" 2>&1
echo "train_step rc=$? at ${SECONDS}s"; grep "^#\|^|" "$OUT/train_step.log" | cut -c1-250
mkdir -p "$OUT/rows"
W='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"warpgroups": 3, "dqk_sum": "add16", "block_v": 64}}}'
left=$((${END_S:-575} - SECONDS - 110))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 40)) --keep_output \
    --variant "w3v64=$W" --plan mosaic:2:2048,jla_gdn:2048,mosaic:1:2048,w3v64:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
left=$((${END_S:-575} - SECONDS))
timeout $left python3 benchmarks/mosaic_diag.py sass --writes 1 --grads '{}' --grads '{"peer": "jla_gdn"}' --out "$OUT/sass" 2>&1 \
    | grep -v '^\s*$' | tail -30
