#!/usr/bin/env bash
# Session 24, device call 1 (one GPU, <= 6 min; carry .whl): register budgets of the L = 1 chunk backward that
# ptxas compiles without serializing its wgmmas (session 23, `mosaic_diag.py ptxas --deviceless` and the
# register sweep of `mosaic_diag.py cubin`: the default (152, 208, 144) serializes them and spills 200 bytes,
# (152, 192, 160) does not and spills 144, (144, 200, 160) does not and spills 180). The kernel alone twice
# each; the GPU test of the best candidate against float64; the whole op at L = 1 with each beside the peer.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl
A='{"registers": [152, 192, 160]}'; B='{"registers": [144, 200, 160]}'
timeout 150 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --grads '{}' --grads "$A" --grads "$B" \
    --grads '{}' --grads "$A" --grads "$B" --out "$OUT/time" 2>&1 | grep '^|\|FAIL'
echo "time at ${SECONDS}s"
timeout 60 python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "test_gpu_three_warpgroups_matches_float64_reference and registers4" -p no:cacheprovider 2>&1 | tail -2
echo "tests at ${SECONDS}s"
mkdir -p "$OUT/rows"
M='"kernel": "mosaic", "chunk_size": 64'
left=$((${END_S:-340} - SECONDS))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 40)) --keep_output \
    --variant "ra={$M, \"mosaic_options\": {\"grads\": $A}}" --variant "rb={$M, \"mosaic_options\": {\"grads\": $B}}" \
    --plan ra:1:2048,mosaic:1:2048,jla_gdn:2048,rb:1:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
