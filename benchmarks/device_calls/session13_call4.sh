#!/usr/bin/env bash
# Session 13, device call 4 (one GPU, the last ~2.5 device minutes): GPU tests of intra(pair_steps=True)
# and the intra kernel alone with / without it (no segment_ids).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 35 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    -k "without_and_with_documents and 1-pairs" 2>&1 | tail -1
timeout 40 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1 --reps 30 --out "$OUT" \
    --opts '{"resets": false}' --opts '{"resets": false, "pair_steps": true}' --opts '{"resets": false}' 2>&1 \
    | grep '^| \|FAILED' | cut -c1-300
