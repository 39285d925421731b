#!/usr/bin/env bash
# Session 19, one-call form of calls 1 and 2 (one GPU, ~9 min), for when machines are scarce: the open
# default decisions in one kernels.py process, in priority order (each row's phases timed on stderr),
# then where the L = 1 default's time goes (op_profile, ours beside the peer's kernels).
#   L = 3: every stage Mosaic ("mall", the chunk backward at 32 value columns) / the XLA chunk backward
#   L = 2: the outputs in the state pass with XLA's factors ("mfused") / the default
#   L = 1: the default beside the peer
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{rows,prof}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 430 python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s 420 --keep_output \
    --variant "mall={$M, $ALL}" \
    --plan mosaic:3:2048,mall:3:2048,mosaic:2:2048,mfused:2:2048,mosaic:1:2048,jla_gdn:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
timeout 100 python3 benchmarks/op_profile.py --out "$OUT/prof" --rows mosaic:1:2048,jla_gdn:2048 --reps 5 \
    --keep_output > "$OUT/prof/op_profile.log" 2>&1
echo "op_profile rc=$?"; grep '^|\|rror' "$OUT/prof/op_profile.log" | cut -c1-200
