#!/usr/bin/env bash
# Session 16's first device call never ran; session 17's first call supersedes it (same work plus the
# L = 3 rows of the new chunk backward).
exec bash "$(dirname "$0")/session17_call1.sh" "$@"
