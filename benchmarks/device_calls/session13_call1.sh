#!/usr/bin/env bash
# Session 13, device call 1 (one GPU): ptxas' register / spill report of every kernel of the op at L = 1
# (the chunk backward with its default register budgets); the intra kernel's per-region profile and its
# knobs timed alone; the SASS size of every kernel (the instruction-fetch hypothesis); the three-warpgroup
# chunk backward's per-warpgroup phase profile.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{ptxas,sass,intra_profile,intra_time,grads_profile}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 benchmarks/mosaic_diag.py profile --kernel intra --writes 1 --out "$OUT/intra_profile" \
    --opts '{}' --opts '{"chunks_per_cta": 1}' 2>&1 | grep -v '^W\|^I0' | tail -30
timeout 150 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 --reps 30 --out "$OUT/intra_time" \
    --opts '{}' --opts '{"block": 2}' --opts '{"block": 8}' --opts '{"merge_split": false}' \
    --opts '{"chunks_per_cta": 1}' --opts '{"chunks_per_cta": 2}' --opts '{"save_inverse": false}' 2>&1 \
    | grep '^| \|FAILED' | cut -c1-300
timeout 150 python3 benchmarks/mosaic_diag.py sass --writes 1 --out "$OUT/sass" 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 150 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT/ptxas" 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 100 python3 benchmarks/mosaic_diag.py profile --writes 1 --out "$OUT/grads_profile" 2>&1 \
    | grep -v '^W\|^I0' | tail -40
