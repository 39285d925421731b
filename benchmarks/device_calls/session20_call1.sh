#!/usr/bin/env bash
# Session 20, device call 1 (one GPU, <= 4 min): 
# 1. GPU test of the whole op at L = 1 with fused outputs and documents, now that the intra kernel saves
#    the inverses in 16 bits there (`pipeline.inverse16`): forward and gradients against the reference.
# 2. The 130m preset's training step (12 unrolled layers, L = 3, K = V = 128, 8 x 2048 tokens, bf16,
#    AdamW) now that every layer shares one jitted kernel call (`prism_jax.ops.prism._prism_pallas_shared`).
#    Session 19's call 4 (run as this session's first call) did not finish compiling its first variant in
#    400 s: the kernels were lowered once per layer. Default (Mosaic chunk backward), then the XLA chunk
#    form if the budget allows.
# Carry .whl_train (grain, ml_collections, array_record, gin-config, portpicker; session19_call4.sh's
# header gives the pip download line).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 70 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_pipeline.py \
    -k "test_gpu_mosaic_pipeline_matches_reference and 1-True-True" 2>&1 | tail -2
timeout 160 python3 benchmarks/train_step.py --preset 130m --steps 10 --budget-s 95 --out "$OUT/train_step_unrolled.json" \
    --variant "default=pallas" --variant "chunk=chunk" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -8
