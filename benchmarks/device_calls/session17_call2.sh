#!/usr/bin/env bash
# Session 17, device call 2 (one GPU, ~4.5 min: the short form of call 1): L = 3 at K = 128 with the new
# Mosaic chunk backward beside the XLA one it replaces; L = 1 default / fused outputs + column solve
# beside the peer (output kept); the GPU tests of the new chunk backward, the fused outputs and the
# column solve.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/kept
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 130 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 105 --keep_output \
    --variant "mboth={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}, \"intra\": {\"diagonal\": \"columns\"}}}" \
    --variant "mall={$M, $ALL}" \
    --plan mall:3:2048,mosaic:3:2048,jla_gdn:2048,mosaic:1:2048,mboth:1:2048 2>&1 | grep '^| [pj]\|rror' | cut -c1-400
timeout 120 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_pipeline.py \
    -k "narrow or columns or (pipeline_matches and 1-True-True)" 2>&1 | tail -5
