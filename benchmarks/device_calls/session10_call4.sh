#!/usr/bin/env bash
# Session 10, device call 4 (one GPU): the whole op at L = 2 before (.old/: session 8's packages) and after
# this session's changes, in one run (call 3's budget skipped the "before" row); L = 3 (and 2) with the
# chunk backward vmapped in XLA behind the Mosaic stages (mosaic_options["grads"]["impl"]); the intra kernel's inverse
# block size (2, 4: no substitution) beside its default 16; the outputs kernel over all 128 value columns
# beside 64 (16-bit starts, as in the op); the DPLR-interleaved peer at L = 2 (flash-linear-attention).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/old" "$OUT/new" "$OUT/l3"
nvidia-smi --query-gpu=name --format=csv,noheader
(cd .old && PYTHONPATH=/tmp/site:. timeout 100 python3 benchmarks/kernels.py --out "$OUT/old" --reps 20 \
    --budget_s 90 --plan mosaic:2:2048 2>&1 | grep '^| pallas' | sed 's/^/before /')
PYTHONPATH=/tmp/site:. timeout 100 python3 benchmarks/kernels.py --out "$OUT/new" --reps 20 --budget_s 90 \
    --plan mosaic:2:2048,jla_gdn:2048 2>&1 | grep '^| [pj]' | sed 's/^/after /'
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":'
PYTHONPATH=/tmp/site:. timeout 150 python3 benchmarks/kernels.py --out "$OUT/l3" --reps 10 --budget_s 140 \
    --variant "m3_xla={$M{\"impl\":\"xla\"}}}" --plan m3_xla:3:2048,m3_xla:2:2048 2>&1 | grep '^| pallas'
PYTHONPATH=/tmp/site:. timeout 100 python3 benchmarks/mosaic_stages.py --stages intra,outputs --writes 1,2 \
    --lengths 2048 --reps 10 --out "$OUT" --try 'intra:{"block":2}' \
    --try 'outputs:{"starts16":true}' --try 'outputs:{"starts16":true,"block_v":128,"slots":1}' 2>&1 | grep '^|'
PYTHONPATH=/tmp/site:. XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 130 python3 benchmarks/dplr_peer.py --out "$OUT" \
    --lengths 2048 --writes 2 --reps 5 --budget_s 120 2>&1 | tail -6
