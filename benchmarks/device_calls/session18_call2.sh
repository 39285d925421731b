#!/usr/bin/env bash
# Session 18, short device call (~3.5 min, for a budget under ~600 s; the second row only if the budget allows): L = 3 at K = 128 with every
# stage Mosaic (the chunk backward at 32 value columns, GPU tests passed in call 1) beside the XLA
# chunk backward (the default there): whether `chunk_grads.NARROW_BY_DEFAULT` should be set.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/l3"
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 200 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 20 --budget_s 190 --keep_output \
    --variant "mall={$M, $ALL}" --plan mall:3:2048,mosaic:3:2048 > "$OUT/l3/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror\|^{' "$OUT/l3/kernels.log" | cut -c1-400
