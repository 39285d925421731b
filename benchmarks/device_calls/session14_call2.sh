#!/usr/bin/env bash
# Session 14, device call 2 (one GPU; call 1 never got a machine, its intra timing is folded in here):
# GPU tests of the outputs written by the state pass (o = Qf S + Of; the factors from the intra kernel at
# L = 1 or from XLA), of the reverse pass that forms the pull-back's terms from P and Qf, and of the
# intra kernel's multi-column substitution (step_columns 2, 4); the whole op at L = 1, 2 with the output
# kept (a training step's work), the unfused pipeline against the fused one, beside the peer; every
# kernel of the fused op at L = 1; the intra kernel alone at step_columns 1 / 2 / 4; fwd+bwd without the
# output; ptxas' registers and spills of the fused kernels.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{kept,grads,op_profile,intra}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_outputs.py \
    tests/kernels/mosaic/test_pipeline.py tests/kernels/mosaic/test_intra.py tests/kernels/mosaic/test_reverse.py \
    -k "writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu or cols2 or cols4 or (pipeline_matches and (True-True or False-True or xla))" \
    2>&1 | tail -4
M='"kernel": "mosaic", "chunk_size": 64'
FUSED="mfused={$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
XLA="mxla={$M, \"mosaic_options\": {\"outputs\": {\"fused\": \"xla\"}}}"
timeout 170 python3 benchmarks/kernels.py --out "$OUT/kept" --reps 20 --budget_s 140 --keep_output --variant "$FUSED" \
    --variant "$XLA" --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048,mosaic:2:2048,mfused:2:2048,mxla:1:2048 2>&1 \
    | grep '^| [pj]' | cut -c1-400
timeout 70 python3 benchmarks/op_profile.py --out "$OUT/op_profile" --reps 5 --keep_output --top 14 \
    --variant "$FUSED" --rows mfused:1:2048 2>&1 | grep '^|\|^#\|busy' | cut -c1-300
timeout 50 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1 --reps 30 --out "$OUT/intra" \
    --opts '{"resets": false}' --opts '{"resets": false, "step_columns": 2}' \
    --opts '{"resets": false, "step_columns": 4}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
timeout 60 python3 benchmarks/kernels.py --out "$OUT/grads" --reps 20 --budget_s 45 --variant "$FUSED" \
    --plan jla_gdn:2048,mosaic:1:2048,mfused:1:2048 2>&1 | grep '^| [pj]' | cut -c1-400
timeout 80 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT" \
    --grads '{"mosaic_options": {"outputs": {"fused": true}}}' --grads '{"peer": "jla_gdn"}' 2>&1 \
    | grep '^| \|FAILED' | cut -c1-300
# (added in session 15) SASS of our op's kernels and the peer's, the raw dumps gzipped under $OUT/sass
mkdir -p "$OUT/sass"
timeout 100 python3 benchmarks/mosaic_diag.py sass --writes 1 --out "$OUT/sass" --grads '{}' \
    --grads '{"peer": "jla_gdn"}' 2>&1 | grep '^| \|FAILED' | cut -c1-300
