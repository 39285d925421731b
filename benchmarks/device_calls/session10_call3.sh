#!/usr/bin/env bash
# Session 10, device call 3 (one GPU): GPU tests of the 16-bit Y (pull-back -> reverse pass); the whole op
# at L = 1, 2 before (session 8's code: a copy of 0dc7021's packages in .old/) and after this session's
# changes (16-bit dq / dk out of the value split, 16-bit Y), in one run on one card; L = 3 at K = 128: the
# default path (kernel "auto" -> Triton split kernels, chunk 32), our XLA chunk form, and the Mosaic
# pipeline with the Triton chunk backward (chunk 64) at v_split = 4.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/old" "$OUT/new" "$OUT/l3"
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=/tmp/site:. timeout 100 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu \
    tests/kernels/mosaic/test_reverse.py tests/kernels/mosaic/test_pullback.py -k "bfloat16-True or None-None-bfloat16" \
    2>&1 | tail -3
PLAN=mosaic:1:2048,mosaic:2:2048
(cd .old && PYTHONPATH=/tmp/site:. timeout 110 python3 benchmarks/kernels.py --out "$OUT/old" --reps 20 \
    --budget_s 90 --plan $PLAN 2>&1 | grep '^| pallas' | sed 's/^/before /')
PYTHONPATH=/tmp/site:. timeout 130 python3 benchmarks/kernels.py --out "$OUT/new" --reps 20 --budget_s 110 \
    --plan jla_gdn:2048,$PLAN 2>&1 | grep '^| [pj]' | sed 's/^/after /'
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":'
PYTHONPATH=/tmp/site:. timeout 220 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 5 --budget_s 200 \
    --variant "m3_vs4={$M{\"v_split\":4}}}" --plan explicit:3:2048,chunk:3:2048,m3_vs4:3:2048 2>&1 | grep '^| [pc]'
