#!/usr/bin/env bash
# Session 10, device call 4 (one GPU): L = 3 at K = 128, where the Mosaic chunk backward does not fit: the
# default path (kernel "auto" -> the Triton split kernels, chunk 32), the Mosaic pipeline with the Triton
# chunk backward at chunk 64 under block settings (mosaic_options["grads"]), our XLA chunk form; then the
# DPLR-interleaved peer at L = 2 (flash-linear-attention, torch).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":'
timeout 330 python3 benchmarks/kernels.py --out "$OUT" --reps 5 --budget_s 300 \
    --variant "m3_vs4={$M{\"v_split\":4}}}" --variant "m3_vs2={$M{\"v_split\":2,\"block_v\":64,\"num_warps\":8}}}" \
    --variant "m3_w8={$M{\"num_warps\":8}}}" \
    --plan explicit:3:2048,chunk:3:2048,m3_vs4:3:2048,m3_w8:3:2048,m3_vs2:3:2048 2>&1 | grep '^| [pcj]'
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 benchmarks/dplr_peer.py --out "$OUT" --lengths 2048 \
    --writes 2 --reps 5 --budget_s 180 2>&1 | tail -6
