#!/usr/bin/env bash
# Session 16, device call 1 (one GPU, ~8 min; what sessions 14-16 built and never ran, most telling first):
# the whole op at L = 1, 2 with the output kept beside the peer: the default pipeline, session 14's fused
# outputs, session 16's column solve of the intra kernel's diagonal blocks, both; GPU tests of all three;
# the chunk backward alone with its options (paired decays off / on; vw by the key or the forward
# warpgroup); the intra kernel alone (row steps, 2 / 4 columns per step, the column solve).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads_alone,intra}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
COLS='"intra": {"diagonal": "columns"}'
FUSED='"outputs": {"fused": true}'
timeout 170 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 145 --keep_output \
    --variant "mfused={$M, \"mosaic_options\": {$FUSED}}" --variant "mcols={$M, \"mosaic_options\": {$COLS}}" \
    --variant "mboth={$M, \"mosaic_options\": {$FUSED, $COLS}}" \
    --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048,mcols:1:2048,mboth:1:2048,mosaic:2:2048,mboth:2:2048,jla_gdn:2048 \
    2>&1 | grep '^| [pj]\|rror' | cut -c1-400
timeout 170 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    tests/kernels/mosaic/test_outputs.py tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_reverse.py \
    tests/kernels/mosaic/test_chunk_grads.py \
    -k "columns or writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu or (pipeline_matches and (True-True or xla)) or three_warpgroups" \
    2>&1 | tail -5
timeout 70 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out "$OUT/grads_alone" \
    --grads '{"paired_decays": false}' --grads '{}' --grads '{"vw_by": "keys"}' --grads '{"vw_by": "forward"}' \
    2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 75 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false}' --opts '{"resets": false, "diagonal": "columns"}' \
    --opts '{"resets": false, "step_columns": 4}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
