#!/usr/bin/env bash
# Session 14, device call 2: never ran in session 14 (no machine); session 15 reordered it and added the
# chunk backward's new options, in session15_call2.sh.
exec bash benchmarks/device_calls/session15_call2.sh "$@"
