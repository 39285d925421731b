#!/usr/bin/env bash
# Session 19, device call 4 (one GPU, ~5 min): the 130m preset's training step (12 layers, L = 3,
# K = V = 128, 8 x 2048 tokens, bf16, AdamW) with today's default (the Mosaic chunk backward at 32 value
# columns, `chunk_grads.NARROW_BY_DEFAULT`), with the XLA chunk backward it replaced behind the Mosaic
# stages, and our XLA chunk form. Carry .whl and .whl_train (grain, ml_collections, array_record,
# gin-config, portpicker: the training package's imports).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
XLA_GRADS='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse"], "mosaic_options": {"grads": {"impl": "xla"}}'
timeout 400 python3 benchmarks/train_step.py --preset 130m --steps 10 --budget-s 330 --out "$OUT/train_step.json" \
    --variant "default=pallas" --variant "xla_grads=pallas:{$XLA_GRADS}" --variant "chunk=chunk" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
