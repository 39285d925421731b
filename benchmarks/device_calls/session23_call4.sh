#!/usr/bin/env bash
# Session 23, device call 4 (one GPU, <= 4 min; carry .whl): the short form of session23_call3.sh: the L = 1
# chunk backward alone with its input copies issued by every warpgroup (loads_by "each") beside one thread
# (the default), twice each; its GPU test against float64; the whole op at L = 1 with it beside the default.
set -o pipefail
source benchmarks/device_calls/setup.sh .whl
E='{"loads_by": "each"}'
timeout 100 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --grads '{}' --grads "$E" --grads '{}' --grads "$E" \
    --out "$OUT/time" 2>&1 | grep '^|'
echo "time at ${SECONDS}s"
timeout 50 python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py -k "test_gpu_three_warpgroups_matches_float64_reference and kw7" \
    -p no:cacheprovider 2>&1 | tail -2
echo "tests at ${SECONDS}s"
mkdir -p "$OUT/rows"
M='{"kernel": "mosaic", "chunk_size": 64, "mosaic_options": {"grads": {"loads_by": "each"}}}'
left=$((${END_S:-230} - SECONDS))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 40)) --keep_output \
    --variant "each=$M" --plan each:1:2048,mosaic:1:2048,jla_gdn:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$? at ${SECONDS}s"; grep '^|\|rror' "$OUT/rows/kernels.log" | cut -c1-300
