#!/usr/bin/env bash
# Session 16, device call 2 (one GPU, ~4.5 min: the short form of call 1): the whole op at L = 1 with the
# output kept, default / fused outputs / column solve / both, beside the peer; the GPU tests of those;
# the chunk backward alone with vw formed by each warpgroup.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads_alone}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
COLS='"intra": {"diagonal": "columns"}'
FUSED='"outputs": {"fused": true}'
timeout 120 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 95 --keep_output \
    --variant "mfused={$M, \"mosaic_options\": {$FUSED}}" --variant "mcols={$M, \"mosaic_options\": {$COLS}}" \
    --variant "mboth={$M, \"mosaic_options\": {$FUSED, $COLS}}" \
    --plan mboth:1:2048,mosaic:1:2048,jla_gdn:2048,mcols:1:2048,mfused:1:2048 2>&1 | grep '^| [pj]\|rror' | cut -c1-400
timeout 90 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_chunk_grads.py \
    -k "columns or (pipeline_matches and 1-True-True) or gpu_three_warpgroups" 2>&1 | tail -4
timeout 50 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out "$OUT/grads_alone" \
    --grads '{}' --grads '{"vw_by": "keys"}' --grads '{"vw_by": "forward"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
