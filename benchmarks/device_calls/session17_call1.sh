#!/usr/bin/env bash
# Session 17, device call 1 (one GPU, ~8 min; the untimed work of sessions 14-17, most telling first):
# the whole op with the output kept beside the peer: L = 1 default / fused outputs + column solve /
# each alone; L = 3 at K = 128 with the new Mosaic chunk backward (the work split at 32 value columns,
# `mosaic_stages` naming all six) beside the XLA chunk backward (the default there until it is timed); L = 2 default / both / the chunk
# backward at 32 value columns. Then the GPU
# tests of all of them, then the intra kernel alone (row steps / column solve).
# Run in session 18 (H100), when "mosaic" was unfused with the row solve; since then both are defaults at
# L = 1, so "mosaic" and "mboth" at L = 1 now time the same path (the session-17 row needs
# '"mosaic_options": {"outputs": {"fused": false}, "intra": {"diagonal": "rows"}}').
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,intra}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
COLS='"intra": {"diagonal": "columns"}'
FUSED='"outputs": {"fused": true}'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 230 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 200 --keep_output \
    --variant "mfused={$M, \"mosaic_options\": {$FUSED}}" --variant "mcols={$M, \"mosaic_options\": {$COLS}}" \
    --variant "mboth={$M, \"mosaic_options\": {$FUSED, $COLS}}" \
    --variant "mall={$M, $ALL}" \
    --variant "mnarrow={$M, \"mosaic_options\": {\"grads\": {\"warpgroups\": 2, \"split\": \"work\", \"block_v\": 32}}}" \
    --plan jla_gdn:2048,mosaic:1:2048,mboth:1:2048,mall:3:2048,mosaic:3:2048,mosaic:2:2048,mboth:2:2048,mfused:1:2048,mcols:1:2048,mnarrow:2:2048,jla_gdn:2048 \
    2>&1 | grep '^| [pj]\|rror' | cut -c1-400
timeout 200 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_outputs.py tests/kernels/mosaic/test_reverse.py \
    tests/kernels/mosaic/test_pipeline.py \
    -k "narrow or columns or writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu or (pipeline_matches and (True-True or xla)) or three_warpgroups" \
    2>&1 | tail -6
timeout 50 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false, "diagonal": "rows"}' --opts '{"resets": false, "diagonal": "columns"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
