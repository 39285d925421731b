#!/usr/bin/env bash
# Session 23, device call 4 (one GPU, <= 4 min; carry .whl): the L = 1 chunk backward alone with its input
# copies issued by every warpgroup (loads_by "each") beside one thread (the default), twice each; its GPU test
# against float64; then every kernel's PTX, ours at L = 1 and the peer's, for `mosaic_diag.py cubin` on any
# machine with ptxas (code size: the device has no nvdisasm for `sass`).
set -o pipefail
source benchmarks/device_calls/setup.sh .whl
E='{"loads_by": "each"}'
timeout 100 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --grads '{}' --grads "$E" --grads '{}' --grads "$E" \
    --out "$OUT/time" 2>&1 | grep '^|\|FAIL'
echo "time at ${SECONDS}s"
timeout 45 python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py -k "test_gpu_three_warpgroups_matches_float64_reference and kw7" \
    -p no:cacheprovider 2>&1 | tail -2
echo "tests at ${SECONDS}s"
left=$((${END_S:-225} - SECONDS))
timeout $left python3 benchmarks/mosaic_diag.py ptx --writes 1 --grads '{}' --grads '{"peer": "jla_gdn"}' --out "$OUT/ptx" 2>&1 \
    | tail -12
echo "ptx at ${SECONDS}s"; du -sh "$OUT/ptx" 2>/dev/null
