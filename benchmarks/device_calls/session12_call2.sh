#!/usr/bin/env bash
# Session 12, device call 2 (same warm H100 as call 1): the three-warpgroup chunk backward alone at L = 1
# with setmaxnreg budgets (WG0, WG1, WG2), the launch share first and last, in one run.
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
for g in '{}' '{"registers": [136, 232, 136]}' '{"registers": [144, 216, 144]}' '{"registers": [160, 200, 144]}' \
         '{"registers": [152, 208, 144]}' '{}'; do
  timeout 35 python3 benchmarks/mosaic_diag.py time --writes 1 --reps 30 --out /tmp --grads "$g" 2>&1 \
      | grep '^| 1\|FAILED' | cut -c1-200
done
