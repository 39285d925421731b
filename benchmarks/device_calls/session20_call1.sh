#!/usr/bin/env bash
# Session 20, device call 1 (one GPU, <= 2.5 min): the 130m preset's training step (12 unrolled layers,
# L = 3, K = V = 128, 8 x 2048 tokens, bf16, AdamW) now that every layer shares one jitted kernel call
# (`prism_jax.ops.prism._prism_pallas_shared`). Session 19's call 4 (run as this session's first call)
# did not finish compiling its first variant in 400 s: the kernels were lowered once per layer.
# Default (Mosaic chunk backward), then the XLA chunk form if the budget allows.
# Carry .whl_train (grain, ml_collections, array_record, gin-config, portpicker; session19_call4.sh's
# header gives the pip download line).
source benchmarks/device_calls/setup.sh .whl_train
timeout 135 python3 benchmarks/train_step.py --preset 130m --steps 10 --budget-s 75 --out "$OUT/train_step_unrolled.json" \
    --variant "default=pallas" --variant "chunk=chunk" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -8
