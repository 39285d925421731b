#!/usr/bin/env bash
# Session 25, device call 2 (one GPU, <= 9 min; carry .whl): run after call 1, with the options it made the
# defaults (or not). Flat in T (not re-run since session 13's H200): the defaults at L = 1, 2 and the peer at
# T = 2K and 32K (B * T = 32K); `block_loops` + `acc_state` beside them at 32K; L = 3 at 2K; then the GPU PTX of
# the op at L = 1 with both options, to check the deviceless machine code against the GPU's ptxas.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl
mkdir -p "$OUT/rows"
M='"kernel": "mosaic", "chunk_size": 64'
B="both={$M, \"mosaic_options\": {\"grads\": {\"block_loops\": true}, \"state\": {\"acc_state\": true}}}"
left=$((${END_S:-500} - SECONDS - 60))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 30)) --keep_output \
    --variant "$B" \
    --plan mosaic:1:32768,jla_gdn:32768,both:1:32768,mosaic:2:32768,both:2:32768,mosaic:1:2048,jla_gdn:2048,mosaic:3:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
timeout 55 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --grads '{"mosaic_options": {"grads": {"block_loops": true}, "state": {"acc_state": true}}}' \
    --out "$OUT/ptxas" 2>&1 | grep '^|' | cut -c1-200
echo "ptxas at ${SECONDS}s"
