#!/usr/bin/env bash
# Session 19, device call 4 (one GPU, ~6.5 min): the GPU tests of impl="auto" and of the intra kernel's
# output factors at L = 2, 3 (call 4 of session 19 ran out of test time before them); then the 130m preset's training step (12 layers, L = 3,
# K = V = 128, 8 x 2048 tokens, bf16, AdamW) with today's default (the Mosaic chunk backward at 32 value
# columns, `chunk_grads.NARROW_BY_DEFAULT`), with the XLA chunk backward it replaced behind the Mosaic
# stages, and our XLA chunk form. Carry .whl and .whl_train (grain, ml_collections, array_record,
# gin-config, portpicker: the training package's imports), made here by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl_train \
#     grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 gin-config==0.5.0 portpicker==1.6.0
# and .whl the same way with jax-linear-attention==0.1.0 (each folder listed in .git/info/exclude).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/ops/test_prism_op.py \
    tests/kernels/mosaic/test_intra.py -k "auto or output_factors_on_gpu" 2>&1 | tail -3
XLA_GRADS='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse"], "mosaic_options": {"grads": {"impl": "xla"}}'
timeout 400 python3 benchmarks/train_step.py --preset 130m --steps 10 --budget-s 330 --out "$OUT/train_step.json" \
    --variant "default=pallas" --variant "xla_grads=pallas:{$XLA_GRADS}" --variant "chunk=chunk" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
