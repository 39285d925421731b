#!/usr/bin/env bash
# Session 14, device call 4 (one GPU; the last ~3 device minutes): the whole op at L = 1 with the output
# kept, unfused against fused (outputs in the state pass, no pull-back kernel), beside the peer; kernels.py
# checks each row's output and gradients against our XLA chunk form.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/kept
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
timeout 150 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 120 --keep_output --variant "$FUSED" \
    --plan mfused:1:2048,mosaic:1:2048,jla_gdn:2048 2>&1 | grep '^| [pj]\|rror' | cut -c1-400
