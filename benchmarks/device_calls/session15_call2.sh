#!/usr/bin/env bash
# Session 15, device call 2: never ran (no machine in session 15 nor at first in session 16); session 16 folded
# it, with its own changes first, into session16_call1.sh.
exec bash benchmarks/device_calls/session16_call1.sh "$@"
