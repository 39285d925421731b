#!/usr/bin/env bash
# Session 17, device call 3 (one GPU, ~6 min): the 130m preset's training step (12 layers, L = 3,
# K = V = 128, 8 x 2048 tokens, bf16) with the chunk backward in XLA (today's default at L = 3), with the
# Mosaic chunk backward at 32 value columns, and with that plus the fused outputs and the column solve;
# our XLA chunk form beside them. First the new chunk backward's GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    tests/kernels/mosaic/test_pipeline.py -k "narrow" 2>&1 | tail -4
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 420 python3 benchmarks/train_step.py --preset 130m --steps 10 --budget-s 330 --out "$OUT/train_step.json" \
    --variant "xla_grads=pallas" --variant "mosaic_grads=pallas:{$ALL}" \
    --variant "mosaic_all=pallas:{$ALL, \"mosaic_options\": {\"outputs\": {\"fused\": true}, \"intra\": {\"diagonal\": \"columns\"}}}" \
    --variant "chunk=chunk" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
