"""The real PrismLM in the loop: a few steps of a tiny PRISM train, the loss falls, sampling works."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config_lib, loop
from train import metrics as metrics_lib
from train import sample as sample_lib
from train_standin import small_run


def tiny_prism_config(data_dir, **overrides):
    config = config_lib.tiny_config(d_model=32, head_k_dim=16, mlp_hidden_dim=64)
    config.sample.max_new_tokens = 6
    return small_run(config, data_dir, overrides, total_steps=10, eval_every_steps=10,
                     checkpoint_every_steps=10)


def test_tiny_prism_loss_falls_and_samples(small_corpus, tmp_path):
    """bf16 compute with float32 parameters and optimizer state (the large presets' recipe)."""
    data_dir, _, _ = small_corpus
    config = tiny_prism_config(data_dir)
    config.model.dtype = "bfloat16"
    summary = loop.train_and_evaluate(config, tmp_path)
    leaves = jax.tree.leaves((summary["state"].params, summary["state"].opt_state))
    assert {x.dtype for x in leaves if x.ndim > 0} == {jnp.dtype("float32")}
    losses = [r["loss"] for r in metrics_lib.read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert np.isfinite(summary["eval_bits_per_byte"]) and summary["eval_perplexity"] < 256
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")
    texts = sample_lib.sample(tmp_path, "class ", max_new_tokens=5, num_samples=2)
    assert len(texts) == 2 and all(t.startswith("class ") for t in texts)


@pytest.mark.slow
def test_readme_command_runs_end_to_end(tmp_path):
    """`prism-train --config configs/tiny.py` on the embedded corpus, shortened to 20 steps."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
         "--config.total_steps=20", "--config.warmup_steps=5", "--config.eval_every_steps=10",
         "--config.sample.max_new_tokens=20"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val perplexity" in proc.stdout and "sample:" in proc.stdout
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "metrics.jsonl").is_file()
    assert list((tmp_path / "tensorboard").glob("events.*"))


def test_compilation_cache_keeps_the_compiled_steps_for_the_next_start(small_corpus, tmp_path):
    """--config.compilation_cache_dir: the first run fills JAX's persistent cache; a second run in a new
    process (another workdir, so no checkpoint to resume) finds every program it compiles there and adds
    nothing. Without the option nothing is written. Subprocesses: the cache is set once per process."""
    data_dir, _, _ = small_corpus
    cache = tmp_path / "cache"

    def run(workdir, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / workdir),
             f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32", "--config.batch_size=4",
             "--config.total_steps=2", "--config.warmup_steps=1", "--config.eval_every_steps=2",
             "--config.eval_batches=1", "--config.sample.max_new_tokens=0", "--config.progress_bar=False",
             "--config.tensorboard=False", "--config.model.d_model=32", "--config.model.head_k_dim=16",
             "--config.model.mlp_hidden_dim=64", *extra],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("plain")
    assert not cache.exists()
    run("first", f"--config.compilation_cache_dir={cache}")
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote no cache entry"
    run("second", f"--config.compilation_cache_dir={cache}")
    assert sorted(p.name for p in cache.iterdir()) == entries
