#!/usr/bin/env bash
# Session 12, device call 2 (one GPU): every kernel's time in one fwd + bwd (ours at L = 1, the peer's);
# the whole op at L = 1, 2, 3 beside the peer, our XLA chunk form at L = 3 and the DPLR-interleaved path
# (flash-linear-attention, torch) at T = 2K, in one run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/prof" "$OUT/kernels"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 benchmarks/op_profile.py --out "$OUT/prof" --rows mosaic:1:2048,jla_gdn:2048 --keep_output \
    --reps 5 2>&1 | grep '^|\|^#\|rror'
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 benchmarks/kernels.py --out "$OUT/kernels" --reps 20 \
    --budget_s 270 --lengths 2048 --writes 1,2,3 --dplr \
    --plan jla_gdn:2048,mosaic:1:2048,mosaic:2:2048,mosaic:3:2048,chunk:3:2048 2>&1 | grep '^| \|rror'
