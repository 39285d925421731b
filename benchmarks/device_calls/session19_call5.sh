#!/usr/bin/env bash
# Session 19, device call 5 (one GPU, ~6.5 min): the intra kernel now forms the output factors at every
# L (until now L = 1 only; XLA formed them at L > 1, 17% slower at L = 2 in call 1). L = 3 and L = 2,
# default / outputs in the state pass (`mfused`: factors from the intra kernel), each row checked
# against the float32 chunk form; then the GPU tests of the factors and of the fused pipeline.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{rows,tests}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s 290 --keep_output \
    --plan mosaic:3:2048,mfused:3:2048,mosaic:2:2048,mfused:2:2048 > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^| [pj]\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
P=tests/kernels/mosaic/test_pipeline.py::test_gpu_mosaic_pipeline_matches_reference
timeout 110 python3 -m pytest -v -p no:xdist -p no:cacheprovider -m gpu "$P[2-True-True]" "$P[3-False-True]" \
    tests/kernels/mosaic/test_intra.py -k "output_factors_on_gpu or gpu_mosaic_pipeline" > "$OUT/tests/gpu_tests.log" 2>&1
echo "tests rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests/gpu_tests.log" | cut -c1-200
