"""The probing train/eval loop and CLI (smoke tests; no research result is asserted)."""

import json

import flax.linen as nn
import jax.numpy as jnp
import pytest

from train.probing import __main__ as cli
from train.probing.run import MODELS, ProbeConfig, train_and_evaluate, train_and_evaluate_many
from train.probing.tasks import TASK_NAMES


class _LocalModel(nn.Module):
    """Stand-in model: embedding, a causal window of 4 tokens, an MLP. Sees only local context."""

    vocab: int = 64
    width: int = 16

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        x = jnp.pad(x, ((0, 0), (3, 0), (0, 0)))
        x = jnp.concatenate([x[:, i:i + tokens.shape[1]] for i in range(4)], axis=-1)
        return nn.Dense(self.vocab)(nn.gelu(nn.Dense(4 * self.width)(x)))


def test_loop_runs_and_reports():
    cfg = ProbeConfig(task="modulo_add", model="prism", steps=3, batch_size=4, eval_samples=20,
                      eval_batch_size=8, log_every=1)
    result = train_and_evaluate(cfg, model=_LocalModel())
    assert 0.0 <= result["eval_accuracy"] <= 1.0
    assert result["eval_answers"] == 24  # rounded up to whole eval batches of 8
    assert result["chance"] == pytest.approx(1 / 16)
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    json.dumps(result, default=str)


def test_loop_is_deterministic_and_learns_a_local_task():
    cfg = ProbeConfig(task="mux", model="prism", steps=40, batch_size=16, learning_rate=1e-2,
                      eval_samples=64, eval_batch_size=64, log_every=20)
    a = train_and_evaluate(cfg, model=_LocalModel())
    b = train_and_evaluate(cfg, model=_LocalModel())
    assert a["eval_accuracy"] == b["eval_accuracy"] and a["history"] == b["history"]
    assert a["history"][-1]["loss"] < a["history"][0]["loss"] - 1.0


def test_runs_trained_together_match_separate_runs():
    cfgs = [ProbeConfig(task=t, model="prism", seed=s, steps=4, batch_size=4, eval_samples=8, log_every=2)
            for t, s in (("palindrome", 0), ("mqar", 3), ("palindrome", 3))]  # tasks and seeds
    together = train_and_evaluate_many(cfgs, model=_LocalModel())
    for cfg, joint in zip(cfgs, together):
        alone = train_and_evaluate(cfg, model=_LocalModel())
        assert joint["task"] == cfg.task and joint["seed"] == cfg.seed
        for h_joint, h_alone in zip(joint["history"], alone["history"]):
            assert h_joint["loss"] == pytest.approx(h_alone["loss"], rel=1e-4)
        assert joint["eval_accuracy"] == pytest.approx(alone["eval_accuracy"])
    assert together[0]["history"][0]["loss"] != pytest.approx(together[2]["history"][0]["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="differ only in task and seed"):
        train_and_evaluate_many([cfgs[0], ProbeConfig(task="mqar", steps=5)], model=_LocalModel())


@pytest.mark.parametrize("bad, match", [
    (dict(task="nope"), "task must be one of"),
    (dict(model="mamba"), "model must be one of"),
    (dict(steps=0), "steps"),
    (dict(d_model=16, num_heads=3), "divisible"),
    (dict(warmup_steps=5, steps=5), "warmup_steps"),
])
def test_bad_config_raises_before_compiling(bad, match):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(ProbeConfig(**bad), model=_LocalModel())


def test_cli_rejects_unknown_task(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--task", "nope", "--model", "prism"])


def test_cli_parses_all_fields():
    cfg, out = cli.parse_args(["--task", "mux", "--model", "la", "--steps", "7", "--learning-rate", "0.003",
                               "--out", "x.json"])
    assert (cfg.task, cfg.model, cfg.steps, cfg.learning_rate, out) == ("mux", "la", 7, 0.003, "x.json")


def _smoke(model):
    cfgs = [ProbeConfig(task=t, model=model, steps=3, batch_size=2, seq_len=64, eval_samples=4, log_every=1)
            for t in TASK_NAMES]
    for result in train_and_evaluate_many(cfgs):
        assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_answers"] >= 4
        assert result["num_params"] > 0 and len(result["history"]) == 3
        assert result["model_config"]["d_model"] == 16 and result["model_config"]["vocab_size"] == 64


def test_smoke_every_task_on_the_tiny_prism_model():
    _smoke("prism")


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in MODELS if m != "prism"])
def test_smoke_every_task_on_the_tiny_baselines(model):
    _smoke(model)


def test_cli_writes_json(tmp_path, monkeypatch):
    def fake_run(cfg, progress):
        progress(1, [2.0])
        return {"task": cfg.task, "model": cfg.model, "eval_accuracy": 0.25, "chance": 0.5, "eval_loss": 1.0,
                "steps_per_s": 3.0, "steps": cfg.steps}

    monkeypatch.setattr(cli, "train_and_evaluate", fake_run)
    out = tmp_path / "sub" / "r.json"
    result = cli.main(["--task", "palindrome", "--model", "gdn", "--steps", "9", "--out", str(out)])
    assert json.loads(out.read_text()) == result == {
        "task": "palindrome", "model": "gdn", "eval_accuracy": 0.25, "chance": 0.5, "eval_loss": 1.0,
        "steps_per_s": 3.0, "steps": 9}


@pytest.mark.slow
def test_cli_trains_the_tiny_model_and_writes_json(tmp_path):
    out = tmp_path / "sub" / "r.json"
    result = cli.main(["--task", "palindrome", "--model", "prism", "--steps", "2", "--batch-size", "2",
                       "--seq-len", "64", "--eval-samples", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["eval_accuracy"] == result["eval_accuracy"] and saved["model"] == "prism"
    assert saved["model_config"]["solver_steps"] == 2
