#!/usr/bin/env bash
# Session 25, device call 1 (one GPU, <= 9.6 min; carry .whl and .before, which holds b5ad8e0's pallas_kernels,
# prism_jax and benchmarks: `rm -rf .before && mkdir .before && git archive b5ad8e0 pallas_kernels prism_jax
# benchmarks | tar -x -C .before`). Written in session 24, which had no GPU; it tests what that session found
# on the CPU machine (docs/benchmarks.md, session 24):
# 1. `icache.py time`: ns per FMA instruction of straight-line code against code size, beside the same FMAs
#    in a loop. Our chunk backward's phases take 7-15 ns per PTX instruction whatever the instructions, and
#    its code (139 KiB) is larger than the peer's chunk backward (101 KiB) and our intra kernel (80 KiB),
#    which run at about half that per instruction.
# 2. GPU tests against float64: `block_loops` (chunk backward) and `acc_state` (state pass, which then
#    spills nothing where it spilled 332 / 196 / 480 bytes at L = 1 / 2 / 3, inside every chunk step).
# 3. The L = 1 chunk backward alone: b5ad8e0's (139 KiB of code), today's default (135 KiB), each also at the
#    register budget (152, 192, 160), which does not serialize the wgmmas; `block_loops` (118 KiB) at its
#    default, the launch share (not serialized, 116 bytes of spills), and at (152, 208, 144) (serialized).
# 4. The whole op at L = 1, 2 before / after / block_loops / acc_state / both beside the peer (gradient
#    errors against the float32 chunk form in every row).
set -o pipefail
source benchmarks/device_calls/setup.sh .whl
R='"registers": [152, 192, 160]'
timeout 120 python3 benchmarks/icache.py time --kib 48,96,128,160,240 --ctas-per-sm 8 --reps 20 \
    --out "$OUT/icache" 2>&1 | grep '^|\|rror'
echo "icache at ${SECONDS}s"
timeout 90 python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py tests/kernels/mosaic/test_state.py \
    -k "(test_gpu_three_warpgroups_matches_float64_reference and (kw9 or kw10 or kw0)) or (test_gpu_matches_float64_reference and True])" \
    -p no:cacheprovider 2>&1 | tail -3
echo "tests at ${SECONDS}s"
(cd .before && PYTHONPATH=/tmp/site:. timeout 70 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 \
    --grads '{}' --grads "{$R}" --out "$OUT/time_before" 2>&1 | grep '^|\|FAIL' | sed 's/^/before /')
echo "before at ${SECONDS}s"
timeout 120 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --grads '{}' --grads '{"block_loops": true}' \
    --grads "{$R}" --grads '{"block_loops": true, "registers": [152, 208, 144]}' --grads '{}' \
    --grads '{"block_loops": true}' \
    --out "$OUT/time_after" 2>&1 | grep '^|\|FAIL'
echo "after at ${SECONDS}s"
mkdir -p "$OUT/rows" "$OUT/rows_before"
M='"kernel": "mosaic", "chunk_size": 64'
left=$((${END_S:-570} - SECONDS))
(cd .before && PYTHONPATH=/tmp/site:. timeout $((left / 4)) python3 benchmarks/kernels.py --out "$OUT/rows_before" \
    --reps 20 --budget_s $((left / 4 - 15)) --keep_output --plan mosaic:1:2048,mosaic:2:2048 2>&1 \
    | grep '^| pallas' | sed 's/^/before /')
left=$((${END_S:-570} - SECONDS))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 20)) --keep_output \
    --variant "loops={$M, \"mosaic_options\": {\"grads\": {\"block_loops\": true}}}" \
    --variant "accs={$M, \"mosaic_options\": {\"state\": {\"acc_state\": true}}}" \
    --variant "both={$M, \"mosaic_options\": {\"grads\": {\"block_loops\": true}, \"state\": {\"acc_state\": true}}}" \
    --plan both:1:2048,mosaic:1:2048,jla_gdn:2048,loops:1:2048,accs:1:2048,accs:2:2048,mosaic:2:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
