#!/usr/bin/env bash
# Session 11, device call 2 (one GPU): GPU tests of the new three-warpgroup chunk backward (L = 1) and of
# the two-warpgroup kernels; the chunk backward alone at L = 1 (default two warpgroups against three, with
# and without setmaxnreg budgets); the whole op at L = 1 with each beside the peer, in one run. As run, the
# pytest step and the stage timing ended at their time limits before the setmaxnreg cases (the option was
# taken out afterwards).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "three_warpgroups or (two_warpgroups and 128-1-values)" 2>&1 | tail -4
timeout 200 python3 benchmarks/mosaic_stages.py --stages grads --writes 1 --lengths 2048 --reps 20 --out "$OUT" \
    --try 'grads:{"warpgroups": 3}' --try 'grads:{"warpgroups": 3, "registers": [176, 184, 152]}' \
    --try 'grads:{"warpgroups": 3, "registers": [160, 208, 144]}' \
    --try 'grads:{"warpgroups": 3, "registers": [184, 168, 160]}' 2>&1 | grep '^{' | cut -c1-300
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":'
timeout 200 python3 benchmarks/kernels.py --out "$OUT" --reps 20 --budget_s 180 \
    --variant "wg3={$M{\"grads\":{\"warpgroups\":3}}}" \
    --plan jla_gdn:2048,mosaic:1:2048,wg3:1:2048 2>&1 | grep '^| [pj]'
