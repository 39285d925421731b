#!/usr/bin/env bash
# Session 10, device call 1 (one GPU): every GPU kernel of the whole op at L = 1, 2 beside the GDN peer's
# (op_profile.py), and the whole op at L = 3 (Mosaic stages + the Triton chunk backward) beside our XLA
# chunk form at L = 3 (the "5x at every L").
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/op_profile.py --out "$OUT" --reps 5 --rows jla_gdn:2048,mosaic:1:2048,mosaic:2:2048
timeout 200 python3 benchmarks/kernels.py --out "$OUT" --reps 10 --budget_s 170 --plan mosaic:3:2048,chunk:3:2048 \
    2>&1 | grep '^|'
