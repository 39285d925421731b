#!/usr/bin/env bash
# Session 8, device call 1 (one GPU): the chunk backward's grid order and TMA reduce-add of dq / dk.
# Run from the repository root on the device machine, wheels carried in .whl/ and .whl_train/.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py 2>&1 \
    | tail -12 | tee "$OUT/gpu_tests_chunk_grads.txt"
timeout 190 python3 benchmarks/mosaic_stages.py --stages grads --writes 2,1 --lengths 2048 --reps 10 --out "$OUT" \
    --try 'grads:{"order":"chunks","dqk_sum":"xla"}' --try 'grads:{"order":"values","dqk_sum":"xla"}' \
    --try 'grads:{"order":"chunks","dqk_sum":"add"}' --try 'grads:{"warpgroups":2,"split":"work"}' 2>&1 | tail -30
timeout 200 python3 benchmarks/kernels.py --out "$OUT" --reps 10 --budget_s 170 \
    --plan jla_gdn:2048,mosaic:2:2048,mosaic:1:2048,mosaic:2:32768,chunk:2:2048 2>&1 | tail -30
