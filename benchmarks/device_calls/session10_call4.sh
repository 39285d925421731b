#!/usr/bin/env bash
# Session 10, device call 4 (one GPU): L = 3 with the chunk backward vmapped in XLA behind the Mosaic stages
# (mosaic_options["grads"]["impl"] = "xla") beside the default path at L = 3 (kernel "auto" -> Triton split).
# (Cut to this by the device time left after failed starts: the L = 2 before / after in one run, the intra /
# outputs knob sweep and the DPLR peer did not run.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
M='"kernel":"mosaic","chunk_size":64,"mosaic_options":{"grads":'
timeout 170 python3 benchmarks/kernels.py --out "$OUT" --reps 5 --budget_s 150 \
    --variant "m3_xla={$M{\"impl\":\"xla\"}}}" --plan m3_xla:3:2048,explicit:3:2048,m3_xla:2:2048 2>&1 | grep '^| pallas'
