#!/usr/bin/env bash
# Session 18, smallest device call (~2 min, for a budget near the floor): the column solve's GPU tests
# (with and without documents), which decide whether `intra(diagonal="columns")` becomes the default.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python3 -m pytest -v -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    -k "columns" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | cut -c1-250
