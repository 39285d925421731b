#!/usr/bin/env bash
# Session 19, device call 1 (one GPU, ~8.5 min). Session 18's open rows: L = 3 with every stage Mosaic
# (the chunk backward at 32 value columns, "mall") beside the XLA chunk backward (the default there),
# now with each row's phases timed on stderr (reference / compile / time), so a row that does not
# finish says where it was; the fused outputs' and reverse-from-factors' GPU tests; and where the
# L = 1 default's time goes now (op_profile, every GPU kernel, ours beside the peer's).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{l3,tests,prof}
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel": "mosaic", "chunk_size": 64'
ALL='"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]'
timeout 250 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 20 --budget_s 240 --keep_output \
    --variant "mall={$M, $ALL}" --plan mosaic:3:2048,mall:3:2048 > "$OUT/l3/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror\|^\[' "$OUT/l3/kernels.log" | cut -c1-300
timeout 110 python3 -m pytest -v -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_outputs.py tests/kernels/mosaic/test_intra.py \
    tests/kernels/mosaic/test_reverse.py \
    -k "writes_the_outputs_on_gpu or output_factors_on_gpu or from_factors_on_gpu" \
    > "$OUT/tests/gpu_tests.log" 2>&1
echo "tests rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests/gpu_tests.log" | cut -c1-200
timeout 130 python3 benchmarks/op_profile.py --out "$OUT/prof" --rows mosaic:1:2048,jla_gdn:2048 --reps 5 \
    --keep_output > "$OUT/prof/op_profile.log" 2>&1
echo "op_profile rc=$?"; grep '^|\|rror' "$OUT/prof/op_profile.log" | cut -c1-200
