"""Compile benchmark points in parallel subprocesses, for a GPU window that compile time would eat.

Used by `throughput.py` and `lm_compare.py`: each point (a model, or a model at one length) is compiled
by the same script run as a worker (its own flags plus the worker flags below) into JAX's persistent
compilation cache; the timing process then loads it. A worker writes a small status JSON (which form
compiled, its compile time, errors); one that does not (crash, or killed at the time limit) gets a
status saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def strip_flag_values(argv, flags):
    """argv without the given flags (both `--flag value` and `--flag=value` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def run_workers(jobs, *, script, argv, cache_dir, max_parallel, timeout_s, describe=None):
    """Runs `python script *argv *job_args --status-file F` for every (key, job_args) in `jobs`, at most
    `max_parallel` at once, all killed `timeout_s` after the first started (the rest never start).

    Returns {key: status dict}; a worker that wrote no status (crashed, or killed at the time limit) gets
    dict(ok=False, killed=True, timed_out=<bool>, errors=[why], error=why), why = its exit code and the
    log's tail: no verdict, so the caller may compile that point itself. `describe(key, status)` gives
    the progress line printed as each worker ends. Workers see XLA_PYTHON_CLIENT_PREALLOCATE=false: they
    share the device and only compile."""
    os.makedirs(cache_dir, exist_ok=True)
    status_dir = tempfile.mkdtemp(prefix="status_", dir=cache_dir)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    pending, running, statuses = list(jobs), {}, {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < max_parallel:
            key, job_args = pending.pop(0)
            stem = os.path.join(status_dir, "_".join(str(k) for k in (key if isinstance(key, tuple) else (key,))))
            log = open(stem + ".log", "w")
            cmd = [sys.executable, script, *argv, *job_args, "--status-file", stem + ".json"]
            running[key] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), stem, log)
        time.sleep(0.2)
        out_of_time = time.perf_counter() - t0 > timeout_s
        for key, (proc, stem, log) in list(running.items()):
            if proc.poll() is None and not out_of_time:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            del running[key]
            try:
                with open(stem + ".json") as f:
                    statuses[key] = json.load(f)
            except (OSError, json.JSONDecodeError):
                with open(stem + ".log") as f:
                    tail = f.read()[-300:]
                why = f"worker exit {proc.returncode}{' (killed at the compile time limit)' if out_of_time else ''}: {tail}"
                statuses[key] = dict(ok=False, killed=True, timed_out=out_of_time, errors=[why], error=why)
            if describe:
                print(f"{describe(key, statuses[key])}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        if out_of_time:
            pending.clear()
    return statuses
