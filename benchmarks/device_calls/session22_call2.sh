#!/usr/bin/env bash
# Session 22, device call 2 (one GPU, <= 9.5 min; carry .whl): the chunk backward at L = 2, 3 as three
# specialised warpgroups (`chunk_grads_wg3w`, mosaic_options={"grads": {"warpgroups": 3}}), alone and with
# the value blocks' dq / dk shares added in 16 bits ("dqk_sum": "add16"), beside today's default (the
# two-warpgroup work split); add16 and fused outputs on today's default; the peer. Whole op fwd+bwd, output
# kept, one process (each row's gradient errors against the float32 chunk form); then the GPU tests of
# both against float64 in what is left.
source benchmarks/device_calls/setup.sh .whl > /dev/null
mkdir -p "$OUT/rows"
M='"kernel": "mosaic", "chunk_size": 64'
W3="{$M, \"mosaic_options\": {\"grads\": {\"warpgroups\": 3}}}"
W3A="{$M, \"mosaic_options\": {\"grads\": {\"warpgroups\": 3, \"dqk_sum\": \"add16\"}}}"
A="{$M, \"mosaic_options\": {\"grads\": {\"dqk_sum\": \"add16\"}}}"
F="{$M, \"mosaic_options\": {\"outputs\": {\"fused\": true}}}"
left=$((${END_S:-540} - SECONDS - 120))
timeout $left python3 benchmarks/kernels.py --out "$OUT/rows" --reps 20 --budget_s $((left - 40)) --keep_output \
    --variant "w3=$W3" --variant "w3a16=$W3A" --variant "a16=$A" --variant "fused=$F" \
    --plan mosaic:2:2048,w3:2:2048,w3a16:2:2048,mosaic:3:2048,w3:3:2048,w3a16:3:2048,jla_gdn:2048,a16:2:2048,fused:2:2048,a16:3:2048,fused:3:2048,w3:2:2048,mosaic:2:2048 \
    > "$OUT/rows/kernels.log" 2>&1
echo "kernels rc=$?"; grep '^|\|rror\|^\[' "$OUT/rows/kernels.log" | cut -c1-300
left=$((${END_S:-540} - SECONDS))
timeout $left python3 -m pytest -q -m gpu tests/kernels/mosaic/test_chunk_grads.py -k "several_writes or add16" \
    -p no:cacheprovider 2>&1 | tail -8
