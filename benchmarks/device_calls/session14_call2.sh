#!/usr/bin/env bash
# Session 14, device call 2 (one GPU): GPU tests of the outputs written by the state pass (o = Qf S + Of;
# the factors from the intra kernel at L = 1 or from XLA); the whole op at L = 1, 2 with the output kept
# (a training step's work) and without, the outputs kernel against the fused pass, beside the peer;
# every kernel of the fused op at L = 1 (with fused outputs the reverse pass forms the pull-back terms from
# P and Qf: no pull-back kernel).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads,op_profile}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_outputs.py \
    tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_reverse.py \
    -k "writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu or (pipeline_matches and (True-True or False-True or xla))" \
    2>&1 | tail -4
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
XLA="mxla={$M, \"mosaic_options\": {\"outputs\": {\"fused\": \"xla\"}}}"
timeout 200 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 170 --keep_output --variant "$FUSED" \
    --variant "$XLA" --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048,mxla:1:2048,mosaic:2:2048,mfused:2:2048 2>&1 \
    | grep '^| [pj]' | cut -c1-400
timeout 100 python3 benchmarks/kernels.py --out "$OUT/grads" --reps 20 --budget_s 80 --variant "$FUSED" \
    --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048 2>&1 | grep '^| [pj]' | cut -c1-400
timeout 100 python3 benchmarks/op_profile.py --out "$OUT/op_profile" --reps 5 --keep_output --top 14 \
    --variant "$FUSED" --rows mfused:1:2048 2>&1 | grep '^|\|^#\|busy' | cut -c1-300
timeout 100 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT" \
    --grads '{"mosaic_options": {"outputs": {"fused": true}}}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
