#!/usr/bin/env bash
# Session 20, call 2 (one GPU, ~5 min; not yet run): the intra kernel's 16-bit inverses at L = 1
# (`{"intra": {"inverse_dtype": "bfloat16"}}`, "x16"; `pipeline.INVERSE16_BY_DEFAULT` turns it on by default)
# against the default float32 inverses cast by XLA before the chunk backward: their GPU tests, the whole op
# fwd+bwd beside the peer, then where the time goes (op_profile: the `wrapped_convert` of X, 0.068 ms in
# session 19, should be gone with x16).
# Carry .whl (jax-linear-attention; session19_call4.sh's header gives the pip download line).
source benchmarks/device_calls/setup.sh .whl
mkdir -p "$OUT"/{rows,prof}
M='"kernel": "mosaic", "chunk_size": 64'
X16='"mosaic_options": {"intra": {"inverse_dtype": "bfloat16"}}'
timeout 60 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_pipeline.py \
    -k "16_bit_inverses" 2>&1 | tail -2
timeout 200 python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s 190 --keep_output \
    --variant "x16={$M, $X16}" --plan mosaic:1:2048,x16:1:2048,jla_gdn:2048,x16:1:2048,mosaic:1:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
timeout 80 python3 benchmarks/op_profile.py --out "$OUT/prof" --variant "x16={$M, $X16}" --rows x16:1:2048 --reps 5 \
    --keep_output > "$OUT/prof/op_profile.log" 2>&1
echo "op_profile rc=$?"; grep '^|\|rror' "$OUT/prof/op_profile.log" | cut -c1-200
