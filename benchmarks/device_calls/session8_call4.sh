#!/usr/bin/env bash
# Session 8, device call 4 (one GPU, same warm machine as call 3): forward-stage knobs of the state pass
# and the outputs kernel at L = 1, 2 (no default changed: differences within the run-to-run spread).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_train/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 125 python3 benchmarks/mosaic_stages.py --stages state,outputs --writes 1,2 --lengths 2048 --reps 10 \
    --out "$OUT" --try 'state:{"slots":2}' --try 'state:{"block_v":32}' --try 'outputs:{"slots":1}' \
    --try 'outputs:{"chunks_per_cta":1}' 2>&1 | grep -v '^{'
