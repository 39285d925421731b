"""Metric sinks: `metrics.jsonl`, TensorBoard event files and the console progress bar."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

LN2 = math.log(2.0)


def eval_summary(nll_sum: float, tokens: float, num_bytes: float) -> dict[str, float]:
    """Loss per token (nats), perplexity and bits per byte from summed negative log-likelihoods."""
    if tokens <= 0:
        raise ValueError("evaluation saw no target tokens: the validation split is empty or too short")
    loss = nll_sum / tokens
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 700.0)),
        "eval_bits_per_byte": nll_sum / (LN2 * max(num_bytes, 1.0)),
        "eval_tokens": tokens,
    }


class MetricsWriter:
    """Appends one JSON object per call to `workdir/metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, enabled: bool = True):
        self._enabled = enabled
        self._path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
            except ImportError:
                print("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)",
                      file=sys.stderr)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar over optimizer steps showing loss, tokens/s and the ETA (off: plain log lines)."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self._bar = None
        self._last_time = time.perf_counter()
        self._last_step = start
        if enabled:
            try:
                from tqdm import tqdm  # noqa: PLC0415
            except ImportError:  # plain log lines instead of a bar
                print("tqdm is not installed: progress as log lines (pip install tqdm)", file=sys.stderr)
                return
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout,
                             mininterval=0.5)

    def update(self, step: int, loss: float, tokens_per_step: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = tokens_per_step * (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={loss:.4f} tok/s={rate:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(f"step {step} loss {loss:.4f} tok/s {rate:,.0f}", flush=True)
        return {"tokens_per_second": rate}

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
