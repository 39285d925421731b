"""Several hosts simulated on this machine: two local processes form one distributed CPU job.

Slow (process start-up and compilation in two processes): run with `pytest -m slow tests/parallel`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
REPO = Path(__file__).resolve().parents[2]
NUM_PROCESSES = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(task: str, *args: str, timeout: int = 900) -> list[dict]:
    """Start NUM_PROCESSES workers on a fresh loopback port; returns each one's JSON result line."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "SLURM_", "OMPI_", "TPU_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, str(i), str(NUM_PROCESSES), task, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for i in range(NUM_PROCESSES)]
    results, failures = [], []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                failures.append(f"process {i} exited {p.returncode}:\n{out[-3000:]}\n{err[-6000:]}")
                continue
            results.append((out, json.loads([l for l in out.splitlines() if l.startswith("{")][-1])))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not failures, "\n".join(failures)
    return results


@pytest.mark.slow
def test_two_processes_psum():
    results = launch("psum")
    want = sum((p + 1) * 10 + i for p in range(NUM_PROCESSES) for i in range(2))
    for i, (_, r) in enumerate(results):
        assert r["process"] == i and r["process_count"] == NUM_PROCESSES and r["device_count"] == 4
        assert r["psum"] == r["want"] == want
        assert r["gathered"] == [10.0, 11.0, 20.0, 21.0]


@pytest.mark.slow
def test_two_processes_train_save_and_resume(tmp_path):
    workdir = str(tmp_path / "run")
    first = launch("train", workdir, "2")  # steps 1-2, checkpoint at step 2, stop
    assert [r["step"] for _, r in first] == [2, 2]
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == 2, steps  # orbax may also keep an earlier step
    second = launch("train", workdir, "0")  # resumes from step 2, trains step 3, evaluates
    assert "resumed from step 2" in second[0][0]
    for _, r in second:
        assert r["step"] == 3
        assert r["eval_loss"] is not None and 0 < r["eval_loss"] < 20
    losses = {r["train_loss"] for _, r in second}
    assert len(losses) == 1, f"processes disagree on the loss: {losses}"  # one job, one loss
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3
