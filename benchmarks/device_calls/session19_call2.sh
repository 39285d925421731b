#!/usr/bin/env bash
# Session 19, device call 2 (one GPU, ~4 min): L = 2 with the outputs in the state pass (factors from
# XLA; opt-in at L > 1, untimed) beside the default, and the L = 1 default beside the peer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/l2"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 230 python3 benchmarks/kernels.py --out "$OUT/l2" --reps 20 --budget_s 220 --keep_output \
    --plan mosaic:1:2048,jla_gdn:2048,mosaic:2:2048,mfused:2:2048 > "$OUT/l2/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror\|^\[' "$OUT/l2/kernels.log" | cut -c1-300
