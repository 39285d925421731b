#!/usr/bin/env bash
# Session 16, device call 3 (one GPU, ~3 min: the last of the session's device time): the intra kernel's
# column solve on the GPU (its tests; the kernel alone, rows against columns) and the whole op at L = 1
# with it, beside the default and the peer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{intra,kept}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py -k columns \
    2>&1 | tail -3
timeout 45 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false}' --opts '{"resets": false, "diagonal": "columns"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
M='"kernel": "mosaic", "chunk_size": 64'
timeout 90 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 65 --keep_output \
    --variant "mcols={$M, \"mosaic_options\": {\"intra\": {\"diagonal\": \"columns\"}}}" \
    --plan mcols:1:2048,mosaic:1:2048,jla_gdn:2048 2>&1 | grep '^| [pj]\|rror' | cut -c1-400
