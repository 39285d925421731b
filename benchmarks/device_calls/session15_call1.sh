#!/usr/bin/env bash
# Session 15, device call 1 (one GPU, ~4 min): why the chunk backward takes ~2x the peer's per CTA for
# about as many multiply-adds (14 M against 13 M per chunk at L = 1). The SASS of every kernel of our
# op at L = 1 and of the peer's (raw dumps come back gzipped for offline reading: spills, shuffles,
# barriers, exp, instruction count); ptxas' registers and spills of the peer beside ours; the
# three-warpgroup chunk backward's per-phase profile on this machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{sass,ptxas,profile}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/mosaic_diag.py sass --writes 1 --out "$OUT/sass" --grads '{}' \
    --grads '{"peer": "jla_gdn"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 120 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT/ptxas" --grads '{}' \
    --grads '{"peer": "jla_gdn"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 120 python3 benchmarks/mosaic_diag.py profile --writes 1 --out "$OUT/profile" 2>&1 \
    | grep '^| \|^#\|FAILED' | cut -c1-300
