#!/usr/bin/env bash
# Session 12, device call 1 (one GPU): GPU tests of the three-warpgroup chunk backward (per-token vectors
# packed into one TMA copy per array; setmaxnreg budgets); the chunk backward alone before (.old: a copy
# of the previous commit's packages) / after, alternated, and with register budgets (each option set its
# own process: a hang loses one row); ptxas' register / spill report of every kernel at L = 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ptxas"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "three_warpgroups" 2>&1 | tail -3
t() {  # TREE GRADS_JSON
  (cd $1 && PYTHONPATH=/tmp/site:. timeout 60 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 \
      --out /tmp --grads "$2" 2>&1 | grep '^| 1\|FAILED' | cut -c1-300 | sed "s|^|$1 |")
}
t .old '{}'; t . '{}'; t .old '{}'; t . '{}'
for r in '[152, 208, 144]' '[136, 232, 136]' '[168, 208, 128]' '[144, 224, 136]'; do
  t . "{\"registers\": $r}"
done
t . '{}'
timeout 170 python3 benchmarks/mosaic_diag.py ptxas --writes 1 --out "$OUT/ptxas" --grads '{}' \
    --grads '{"registers": [152, 208, 144]}' --grads '{"warpgroups": 2}' 2>&1 | grep '^|\|FAIL\|rror'
