#!/usr/bin/env bash
# Session 8, device call 2 (one GPU): the new defaults (order "chunks", TMA add) in the whole op, the L = 1
# alternatives of the chunk backward, the XLA chunk form and the DPLR peer for the ratios.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 benchmarks/mosaic_stages.py --stages grads --writes 1,2 --lengths 2048 --reps 10 --out "$OUT" \
    --try 'grads:{"warpgroups":2,"split":"work"}' --try 'grads:{"warpgroups":1}' 2>&1 | grep '^|'
timeout 330 python3 benchmarks/kernels.py --out "$OUT" --reps 10 --budget_s 290 \
    --variant 'mosaic_work={"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":{"warpgroups":2,"split":"work"}}}' \
    --plan jla_gdn:2048,mosaic:2:2048,mosaic:1:2048,mosaic_work:1:2048,mosaic:2:32768,jla_gdn:32768,chunk:2:2048 \
    2>&1 | grep -v '^{'
