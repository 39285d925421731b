#!/usr/bin/env bash
# Session 14, device call 1 (one GPU): GPU tests of the intra kernel's multi-column substitution
# (step_columns 2, 4: written in session 13, never run on a GPU); the intra kernel alone at step_columns
# 1 / 2 / 4; its per-region profile at 2; every GPU kernel of the whole op at L = 1 with the output kept,
# ours beside the peer's (where the time goes now, after sessions 11-13).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{intra,intra_profile,op_profile}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    -k "without_and_with_documents" 2>&1 | tail -4
timeout 100 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false}' --opts '{"resets": false, "step_columns": 2}' \
    --opts '{"resets": false, "step_columns": 4}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 60 python3 benchmarks/mosaic_diag.py profile --kernel intra --writes 1 --out "$OUT/intra_profile" \
    --opts '{"resets": false, "step_columns": 2}' 2>&1 | grep '^| \|^L =\|FAILED' | cut -c1-300
timeout 120 python3 benchmarks/op_profile.py --out "$OUT/op_profile" --reps 5 --keep_output --top 14 \
    --rows jla_gdn:2048,mosaic:1:2048 2>&1 | grep '^|\|^#\|busy' | cut -c1-300
