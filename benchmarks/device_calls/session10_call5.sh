#!/usr/bin/env bash
# Session 10, device call 5 (one GPU): the whole op at L = 2 before (.old/: session 8's packages) and after
# this session's changes, in one run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/old" "$OUT/new"
nvidia-smi --query-gpu=name --format=csv,noheader
(cd .old && PYTHONPATH=/tmp/site:. timeout 60 python3 benchmarks/kernels.py --out "$OUT/old" --reps 10 \
    --budget_s 50 --plan mosaic:2:2048 2>&1 | grep '^| pallas' | sed 's/^/before /')
PYTHONPATH=/tmp/site:. timeout 60 python3 benchmarks/kernels.py --out "$OUT/new" --reps 10 --budget_s 50 \
    --plan mosaic:2:2048 2>&1 | grep '^| pallas' | sed 's/^/after /'
