#!/usr/bin/env bash
# Session 15, device call 2 (one GPU; session 14's call 2 reordered so that the A/B of the whole op comes
# first, plus the chunk backward's new options): the whole op at L = 1, 2 with the output kept (a
# training step's work), unfused against fused, beside the peer; the chunk backward alone with paired
# decay matrices (default) / without / vw formed by the key or the forward warpgroup (session 16); GPU tests of the fused path and
# of the chunk backward's options; ptxas and SASS of our kernels and the peer's; the fused op's kernels;
# the intra kernel's step_columns.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads_alone,op_profile,intra,sass,ptxas}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
timeout 150 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 125 --keep_output --variant "$FUSED" \
    --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048,mosaic:2:2048,mfused:2:2048 2>&1 \
    | grep '^| [pj]' | cut -c1-400
timeout 70 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out "$OUT/grads_alone" \
    --grads '{"paired_decays": false}' --grads '{}' --grads '{"vw_by": "keys"}' --grads '{"vw_by": "forward"}' \
    2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_outputs.py \
    tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_reverse.py \
    tests/kernels/mosaic/test_chunk_grads.py \
    -k "writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu or (pipeline_matches and (True-True or xla)) or three_warpgroups" \
    2>&1 | tail -4
timeout 90 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT/ptxas" --grads '{}' \
    --grads '{"mosaic_options": {"outputs": {"fused": true}}}' --grads '{"peer": "jla_gdn"}' 2>&1 \
    | grep '^| \|FAILED' | cut -c1-300
timeout 80 python3 benchmarks/mosaic_diag.py sass --writes 1 --out "$OUT/sass" --grads '{}' \
    --grads '{"peer": "jla_gdn"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 60 python3 benchmarks/op_profile.py --out "$OUT/op_profile" --reps 5 --keep_output --top 14 \
    --variant "$FUSED" --rows mfused:1:2048 2>&1 | grep '^|\|^#\|busy' | cut -c1-300
timeout 45 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false}' --opts '{"resets": false, "step_columns": 2}' \
    --opts '{"resets": false, "step_columns": 4}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
