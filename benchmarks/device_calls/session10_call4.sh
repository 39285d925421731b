#!/usr/bin/env bash
# Session 10, device call 4 (one GPU): L = 3 (and 2) with the chunk backward vmapped in XLA behind the Mosaic
# stages (mosaic_options["grads"]["impl"] = "xla") beside the default path at L = 3; then the whole op at L = 2
# before (.old/: session 8's packages) and after this session's changes, in one run (call 3's budget skipped
# that "before" row). (The intra / outputs knob sweep and the DPLR peer were cut: device time ran short.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/old" "$OUT/new" "$OUT/l3"
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":'
PYTHONPATH=/tmp/site:. timeout 150 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 10 --budget_s 140 \
    --variant "m3_xla={$M{\"impl\":\"xla\"}}}" --plan m3_xla:3:2048,explicit:3:2048,m3_xla:2:2048 2>&1 | grep '^| pallas'
(cd .old && PYTHONPATH=/tmp/site:. timeout 70 python3 benchmarks/kernels.py --out "$OUT/old" --reps 10 \
    --budget_s 60 --plan mosaic:2:2048 2>&1 | grep '^| pallas' | sed 's/^/before /')
PYTHONPATH=/tmp/site:. timeout 80 python3 benchmarks/kernels.py --out "$OUT/new" --reps 10 --budget_s 70 \
    --plan mosaic:2:2048,jla_gdn:2048 2>&1 | grep '^| [pj]' | sed 's/^/after /'
