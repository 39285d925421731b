#!/usr/bin/env bash
# Session 13, device call 1 (one GPU): GPU tests of the reworked intra kernel (gate-free inverse, Qe from
# (I - X0) without the right-hand side product at the first write, m0 held through the inverse); the
# intra kernel alone before (old_s13/: the packages of 3a4aee5, made with `mkdir old_s13 && git archive
# 3a4aee5 pallas_kernels prism_jax benchmarks | tar -x -C old_s13`, untracked so that it travels) and
# after, with its knobs; its per-region profile; the whole op at L = 1, 2 beside the peer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"/{intra_old,intra_new,intra_profile,kernels}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/kernels/mosaic/test_intra.py \
    -k "without_and_with_documents or 16-True-None" 2>&1 | tail -4
(cd old_s13 && PYTHONPATH=/tmp/site:. timeout 70 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 \
    --reps 30 --out "$OUT/intra_old" --opts '{}' 2>&1 | grep '^| \|FAILED' | cut -c1-300 | sed 's/^/old /')
timeout 120 python3 benchmarks/mosaic_diag.py time --kernel intra --writes 1,2 --reps 30 --out "$OUT/intra_new" \
    --opts '{}' --opts '{"resets": false}' --opts '{"resets": false, "hold_m": false}' \
    --opts '{"resets": false, "block": 8}' --opts '{"resets": false, "merge_split": false}' 2>&1 \
    | grep '^| \|FAILED' | cut -c1-300 | sed 's/^/new /'
timeout 60 python3 benchmarks/mosaic_diag.py profile --kernel intra --writes 1 --out "$OUT/intra_profile" \
    --opts '{"resets": false}' 2>&1 | grep '^| \|^L =\|FAILED' | cut -c1-300
timeout 150 python3 benchmarks/kernels.py --out "$OUT/kernels" --reps 20 --budget_s 120 --lengths 2048 --writes 1,2 \
    --plan jla_gdn:2048,mosaic:1:2048,mosaic:2:2048 2>&1 | grep '^| [pj]' | cut -c1-400
