#!/usr/bin/env bash
# Session 13, device call 3 (one GPU, the session's last device minutes): GPU tests of the intra kernel
# with the reset correction only in chunks that have a reset (reset_chunks_only); the intra kernel alone
# with the correction in every chunk, only in chunks with a reset, and without it (no segment_ids).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    -k "without_and_with_documents and chunks" 2>&1 | tail -2
timeout 60 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 --reps 30 --out "$OUT" \
    --opts '{}' --opts '{"reset_chunks_only": true}' --opts '{"resets": false}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
