#!/usr/bin/env bash
# Session 18, device call 2 (one GPU, ~8 min). Call 1 (session17_call1.sh on an H100) timed L = 1
# default / fused outputs + column solve beside the peer and passed the narrow chunk backward's GPU
# tests, then ran out of its slots. This call: the GPU tests of the column solve, the fused outputs
# and the reverse pass from factors (log kept), then L = 3 with every stage Mosaic (the chunk backward
# at 32 value columns) beside the XLA chunk backward, and L = 2 default / fused + columns, the peer.
# Since the column solve became the default on a GPU, "mosaic" at L = 2 already has it: the L = 2 pair
# is unfused / fused outputs (factors from XLA), the one L = 2 default still untimed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{l3,tests}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -v -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    tests/kernels/mosaic/test_outputs.py tests/kernels/mosaic/test_reverse.py \
    -k "columns or writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu" \
    > "$OUT/tests/gpu_tests.log" 2>&1
echo "tests rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests/gpu_tests.log" | cut -c1-200
M='"kernel": "mosaic", "chunk_size": 64'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
BOTH='"mosaic_options": {"outputs": {"fused": true}, "intra": {"diagonal": "columns"}}'
timeout 330 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 20 --budget_s 310 --keep_output \
    --variant "mall={$M, $ALL}" --variant "mboth={$M, $BOTH}" \
    --plan mall:3:2048,mosaic:3:2048,mboth:2:2048,mosaic:2:2048,jla_gdn:2048 \
    > "$OUT/l3/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror' "$OUT/l3/kernels.log" | cut -c1-300
