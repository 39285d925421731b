#!/usr/bin/env bash
# Session 12, device call 3 (same warm H100): the whole op at L = 1 with the budgets (152, 208, 144) beside
# the peer (jla GDN), T = 2K. As run, the row without budgets did not fit the time budget.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":{"registers":'
timeout 115 python3 benchmarks/kernels.py --out "${OUT:-/tmp/out}" --reps 10 --budget_s 100 --lengths 2048 --writes 1 \
    --variant "reg1={$M[152,208,144]}}}" --plan jla_gdn:2048,reg1:1:2048,mosaic:1:2048
