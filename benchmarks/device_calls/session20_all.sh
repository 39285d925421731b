#!/usr/bin/env bash
# Session 20's open device work in one call (one GPU, ~7.5 min), for when machines are scarce: first
# `session20_call1.sh` (the 130m training step with the shared kernel call: decides op_impl="auto" as the
# model default), then `session20_call2.sh` (the 16-bit inverses at L = 1: decides
# pipeline.INVERSE16_BY_DEFAULT). Carry .whl and .whl_train (session19_call4.sh's header gives the
# pip download lines).
bash benchmarks/device_calls/session20_call1.sh
bash benchmarks/device_calls/session20_call2.sh
