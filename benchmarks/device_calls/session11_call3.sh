#!/usr/bin/env bash
# Session 11, device call 3 (one GPU): the chunk backward alone at L = 1 (two warpgroups, the default, against
# three, with setmaxnreg budgets), then the in-kernel profiler's per-phase times of both.
# As run: the rows with setmaxnreg budgets did not finish within the time limit (nor did their GPU test in
# call 2), so the `registers` option was taken out afterwards; rerun this script without those rows.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/time" "$OUT/profile"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out "$OUT/time" --grads '{}' \
    --grads '{"warpgroups": 3}' --grads '{"warpgroups": 3, "registers": [176, 184, 152]}' \
    --grads '{"warpgroups": 3, "registers": [160, 208, 144]}' --grads '{"warpgroups": 3, "registers": [184, 176, 152]}' \
    --grads '{"warpgroups": 3, "registers": [152, 176, 184]}' 2>&1 | grep '^|\|FAIL'
timeout 150 python3 benchmarks/mosaic_diag.py profile --writes 1 --out "$OUT/profile" --grads '{"warpgroups": 3}' \
    --grads '{}' 2>&1 | grep '^|\|^L =\|FAIL'
