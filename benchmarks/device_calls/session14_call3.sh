#!/usr/bin/env bash
# Session 14, device call 3 (one GPU; the short form of call 2 for the session's last device minutes):
# GPU tests of the fused path at L = 1 (outputs in the state pass from the intra kernel's factors, the
# reverse pass without the pull-back); the whole op at L = 1 with the output kept, unfused against fused,
# beside the peer; every kernel of the fused op.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,op_profile}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_outputs.py \
    tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_reverse.py \
    -k "writes_the_outputs_on_gpu and 1 or output_factors_on_gpu or from_factors_on_gpu or (pipeline_matches and 1-True-True)" \
    2>&1 | tail -4
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
timeout 130 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 100 --keep_output --variant "$FUSED" \
    --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048 2>&1 | grep '^| [pj]' | cut -c1-400
timeout 70 python3 benchmarks/op_profile.py --out "$OUT/op_profile" --reps 5 --keep_output --top 14 \
    --variant "$FUSED" --rows mfused:1:2048 2>&1 | grep '^|\|^#\|busy' | cut -c1-300
