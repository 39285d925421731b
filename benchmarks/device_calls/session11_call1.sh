#!/usr/bin/env bash
# Session 11, device call 1 (one GPU): GPU tests of the two-warpgroup chunk backward (its [C, 64] output
# jobs now alternate dk_0 / dq between the warpgroups); the whole op at L = 1, 2 before (HEAD of session
# 10, a copy in .old/) and after, beside the peer in one run; the intra kernel's inverse blocking and the
# outputs kernel's block_v / slots as whole-op variants at L = 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/old" "$OUT/new"
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=/tmp/site:. timeout 120 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu \
    tests/kernels/mosaic/test_chunk_grads.py -k "reference and (128-1-values or 128-2-work)" 2>&1 | tail -3
PLAN=mosaic:1:2048,mosaic:2:2048
(cd .old && PYTHONPATH=/tmp/site:. timeout 100 python3 benchmarks/kernels.py --out "$OUT/old" --reps 20 \
    --budget_s 85 --plan $PLAN 2>&1 | grep '^| pallas' | sed 's/^/before /')
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":'
PYTHONPATH=/tmp/site:. timeout 300 python3 benchmarks/kernels.py --out "$OUT/new" --reps 20 --budget_s 280 \
    --variant "ib2={$M{\"intra\":{\"block\":2}}}" --variant "ib8={$M{\"intra\":{\"block\":8}}}" \
    --variant "ib32={$M{\"intra\":{\"block\":32}}}" \
    --variant "ov128={$M{\"outputs\":{\"block_v\":128,\"slots\":1}}}" \
    --variant "ov64={$M{\"outputs\":{\"block_v\":64}}}" \
    --plan jla_gdn:2048,$PLAN,ib2:1:2048,ib8:1:2048,ib32:1:2048,ov128:1:2048,ov64:1:2048 2>&1 \
    | grep '^| [pj]' | sed 's/^/after /'
