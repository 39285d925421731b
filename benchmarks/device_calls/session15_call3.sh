#!/usr/bin/env bash
# Session 15, device call 3 (one GPU, ~4 min: the short form of call 2 for the last of the session's
# device time): the whole op at L = 1 with the output kept, unfused / fused beside the peer; the chunk
# backward alone with paired decays off / on / vw on the key side / on the forward side; the GPU tests of those.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads_alone}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
timeout 120 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 95 --keep_output --variant "$FUSED" \
    --plan mfused:1:2048,mosaic:1:2048,jla_gdn:2048 2>&1 | grep '^| [pj]\|rror' | cut -c1-400
timeout 70 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out "$OUT/grads_alone" \
    --grads '{"paired_decays": false}' --grads '{}' --grads '{"vw_by": "keys"}' --grads '{"vw_by": "forward"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 80 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    tests/kernels/mosaic/test_pipeline.py -k "three_warpgroups or (pipeline_matches and 1-True-True)" 2>&1 | tail -4
