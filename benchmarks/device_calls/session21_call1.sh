#!/usr/bin/env bash
# Session 21, device call 1 (one GPU, <= 9 min): why the 130m training step with the kernels has not
# finished compiling in two calls (sessions 20, 21: 135 s and 400 s timeouts, nothing printed after the
# header). Phase by phase, each in its own process under its own timeout:
#   1. the op alone at one 130m layer's shape (B 8, T 2048, H 6, L 3, K = V = 128, 4 documents per row),
#      today's kernels, forward + gradients: lower / compile / first call / ms, and errors against the
#      float32 chunk form; if it does not finish, again without documents;
#   2. the XLA chunk form at the same shape;
#   3. the 130m training step (12 unrolled layers) with the kernels, printing lowered / compiled / first
#      step as each ends; then the XLA chunk form's step if the kernels' was done within 150 s.
# Carry .whl_train (session19_call4.sh's header gives the pip download line).
set -o pipefail
source benchmarks/device_calls/setup.sh .whl_train
quiet() { grep -v "^WARNING\|^I0000\|^W0000\|^E0000"; }
timeout 170 python3 benchmarks/op_phases.py --impl pallas --check --out "$OUT/op_pallas.json" 2>&1 | quiet \
    || { echo "# pallas with documents: rc=$?"; timeout 90 python3 benchmarks/op_phases.py --impl pallas --documents 0 2>&1 | quiet; }
timeout 60 python3 benchmarks/op_phases.py --impl chunk --out "$OUT/op_chunk.json" 2>&1 | quiet
# XLA's own account of its compile (pass times, the autotuner, LLVM / ptxas per module) goes to the log that
# comes back with $OUT, whatever the timeout leaves of it.
XLA_FLAGS="--xla_gpu_print_compilation_stats" TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE="gpu_compiler=3,nvptx_compiler=3" \
timeout ${TRAIN_S:-270} python3 benchmarks/train_step.py --preset 130m --steps 5 --out "$OUT/train_step_unrolled.json" \
    --budget-s 150 --variant "default=pallas" --variant "chunk=chunk" > "$OUT/train_step.log" 2>&1
echo "train_step rc=$?"; grep "^#\|^|" "$OUT/train_step.log"; grep -i "runtime\|ptxas\|took" "$OUT/train_step.log" | tail -20 | cut -c1-250
