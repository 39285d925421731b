#!/usr/bin/env bash
# Session 13, device call 2 (same machine): issue 5's table at T = 2K in one run: ours (Mosaic) at L = 1,
# 2, 3, the peer (jla GDN), our XLA chunk form at L = 1, 2, 3, then the DPLR-interleaved exact PRISM path
# (flash-linear-attention, torch) at L = 2; the whole op before the intra rework (old_s13/, see call 1).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{old,new}
nvidia-smi --query-gpu=name --format=csv,noheader
(cd old_s13 && PYTHONPATH=/tmp/site:. timeout 110 python3 benchmarks/kernels.py --out "$OUT/old" --reps 20 \
    --budget_s 90 --lengths 2048 --writes 1,2 --plan mosaic:1:2048,mosaic:2:2048 2>&1 | grep '^| pallas' \
    | cut -c1-400 | sed 's/^/old /')
timeout 420 python3 benchmarks/kernels.py --out "$OUT/new" --reps 20 --budget_s 330 --lengths 2048 --writes 2 --dplr \
    --plan jla_gdn:2048,mosaic:1:2048,mosaic:2:2048,mosaic:3:2048,chunk:1:2048,chunk:2:2048,chunk:3:2048 2>&1 \
    | grep '^| \|rror' | cut -c1-400
