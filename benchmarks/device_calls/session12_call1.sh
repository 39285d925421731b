#!/usr/bin/env bash
# Session 12, device call 1 (one H100; 11 failed starts and 7 refusals before it took 22 of 30 device minutes): GPU tests of the three-warpgroup
# chunk backward (per-token vectors packed into one TMA copy per array; setmaxnreg budgets); the chunk
# backward alone before (.old: a copy of the previous commit's packages) / after, and with register budgets
# (each option set its own process: a hang loses one row), and .exp (the raw q k^T, k k^T formed again
# where used instead of held across waits). Both folders were made here and carried (git-ignored):
# mkdir .old && git archive 2d10924 pallas_kernels prism_jax benchmarks | tar -x -C .old; .exp the same
# packages with that change (WG0 issues q k^T again before its decay sums, WG1 k k^T with dR E^T).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/kernels"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 75 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_chunk_grads.py \
    -k "three_warpgroups and 128-128" 2>&1 | tail -3
t() {  # TREE GRADS_JSON
  (cd $1 && PYTHONPATH=/tmp/site:. timeout 40 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 \
      --out /tmp --grads "$2" 2>&1 | grep '^| 1\|FAILED' | cut -c1-300 | sed "s|^|$1 |")
}
t .old '{}'; t . '{}'
t . '{"registers": [152, 208, 144]}'
t .exp '{}'
