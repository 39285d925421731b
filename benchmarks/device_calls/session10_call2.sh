#!/usr/bin/env bash
# Session 10, device call 2 (one GPU): GPU tests of the chunk backward (dq / dk now leave in 16 bits where
# one CTA holds every value column), every kernel of the whole op with the output kept (a training step's
# work) for the peer and L = 1, and the whole op at L = 1, 2 beside the peer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "reference and (1-kw0 or 2-kw2 or 1-kw1 or 128-1-values or 128-2-work)" 2>&1 | tail -4
timeout 150 python3 benchmarks/op_profile.py --out "$OUT" --reps 5 --keep_output --top 12 \
    --rows jla_gdn:2048,mosaic:1:2048,mosaic:2:2048
timeout 200 python3 benchmarks/kernels.py --out "$OUT" --reps 10 --budget_s 170 \
    --plan jla_gdn:2048,mosaic:1:2048,mosaic:2:2048 2>&1 | grep '^|'
