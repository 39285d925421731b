#!/usr/bin/env bash
# Session 8, device call 3 (one GPU): every Mosaic stage alone at L = 1, 2 (where the whole op's time goes),
# the XLA chunk form at L = 1 and the DPLR-interleaved peer at L = 2 (the 5x and 10x ratios).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 210 python3 benchmarks/mosaic_stages.py --stages intra,state,outputs,pullback,reverse,grads --writes 2,1 \
    --lengths 2048 --reps 10 --out "$OUT" 2>&1 | grep '^|'
timeout 90 python3 benchmarks/kernels.py --out "$OUT" --reps 10 --budget_s 60 --plan chunk:1:2048,mosaic:1:2048 \
    2>&1 | grep '^|'
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 benchmarks/dplr_peer.py --out "$OUT" --lengths 2048 \
    --writes 2 --reps 5 --budget_s 120 2>&1 | tail -8
