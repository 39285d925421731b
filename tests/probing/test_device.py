"""Device-data training (train.probing.device) and the grid's resume / merged JSON / budget logic."""

import json

import pytest

from train.probing import grid, report
from train.probing.device import BudgetExceeded, train_and_evaluate_on_device
from train.probing.run import ProbeConfig

from test_run import _LocalModel  # noqa: E402  (the stand-in model of test_run.py)

SMALL = dict(model="prism", steps=4, batch_size=4, eval_samples=8, eval_batch_size=8, log_every=2)


def test_seeds_trained_together_match_separate_runs():
    """Two seeds of one task in one vmapped scan == each seed alone (same data stream, same math)."""
    cfgs = [ProbeConfig(task="mux", seed=s, **SMALL) for s in (0, 1)]
    together = train_and_evaluate_on_device(cfgs, model=_LocalModel(), steps_per_call=2)
    alone = train_and_evaluate_on_device(cfgs[1:], model=_LocalModel(), steps_per_call=4)[0]
    assert [h["step"] for h in alone["history"]] == [1, 2, 4]
    for h_joint, h_alone in zip(together[1]["history"], alone["history"], strict=True):
        assert h_joint["step"] == h_alone["step"]
        assert h_joint["loss"] == pytest.approx(h_alone["loss"], rel=1e-4)
    assert together[1]["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-4)
    assert together[1]["eval_answers"] == alone["eval_answers"] == 8
    # the other seed is another run: other init, other data
    assert together[0]["history"][0]["loss"] != pytest.approx(together[1]["history"][0]["loss"], rel=1e-4)
    assert together[1]["data"] == "device" and together[1]["runs_trained_together"] == 2


def test_device_runs_reject_bad_groups():
    with pytest.raises(ValueError, match="differ only in task and seed"):
        train_and_evaluate_on_device([ProbeConfig(task="mux", **SMALL), ProbeConfig(task="mux", seed=1, steps=5)],
                                     model=_LocalModel())
    with pytest.raises(ValueError, match="distinct"):
        train_and_evaluate_on_device([ProbeConfig(task="mux", **SMALL)] * 2, model=_LocalModel())
    with pytest.raises(ValueError, match="steps_per_call"):
        train_and_evaluate_on_device([ProbeConfig(task="mux", **SMALL)], model=_LocalModel(), steps_per_call=0)


def _fake_point(cfg, acc=0.5):
    return {"task": cfg.task, "model": cfg.model, "seed": cfg.seed, "eval_accuracy": acc, "chance": 0.5,
            "compile_s": 0.0, "train_s": 1.0, "steps_per_s": 1.0, "data": "device"}


def test_grid_resume_skips_written_points_and_merges(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfgs, *, model, steps_per_call, deadline, progress):
        calls.append(sorted((c.model, c.task, c.seed) for c in cfgs))
        return [_fake_point(c) for c in cfgs]

    monkeypatch.setattr("train.probing.device.train_and_evaluate_on_device", fake_train)
    common = ["--data", "device", "--tasks", "mux,parity", "--steps", "3"]
    first = tmp_path / "w1" / "all.json"
    grid.main([*common, "--models", "prism", "--seeds", "0", "--out-dir", str(tmp_path / "w1"),
               "--merged-json", str(first)])
    assert calls == [[("prism", "mux", 0), ("prism", "parity", 0)]]
    # second window: fresh out-dir, the first window's merged file as --resume, more seeds and a model
    second = tmp_path / "w2" / "all.json"
    known = grid.main([*common, "--models", "prism,la", "--seeds", "0,1", "--out-dir", str(tmp_path / "w2"),
                       "--merged-json", str(second), "--resume", str(first)])
    assert calls[1:] == [[("prism", "mux", 1), ("prism", "parity", 1)],
                         [("la", "mux", 0), ("la", "mux", 1), ("la", "parity", 0), ("la", "parity", 1)]]
    merged = json.loads(second.read_text())
    assert len(merged["results"]) == len(known) == 8
    assert len(list((tmp_path / "w2").glob("*-s*.json"))) == 6  # only the points trained in window 2
    # a third call with everything written trains nothing
    grid.main([*common, "--models", "prism,la", "--seeds", "0,1", "--out-dir", str(tmp_path / "w2"),
               "--merged-json", str(second)])
    assert len(calls) == 3
    # the report reads the merged file: mean over two seeds
    table = report.markdown_table(report.load_results(str(second)))
    assert "0.50 ± 0.00 (n=2)" in next(line for line in table.splitlines() if "MUX" in line)


def test_grid_abandons_a_model_over_budget_and_goes_on(tmp_path, monkeypatch):
    def fake_train(cfgs, *, model, steps_per_call, deadline, progress):
        assert deadline is not None
        if cfgs[0].model == "prism":
            raise BudgetExceeded("too slow")
        return [_fake_point(c) for c in cfgs]

    monkeypatch.setattr("train.probing.device.train_and_evaluate_on_device", fake_train)
    known = grid.main(["--data", "device", "--tasks", "mux", "--models", "prism,la", "--steps", "3",
                       "--budget-s", "100", "--out-dir", str(tmp_path)])
    assert sorted(known) == [("mux", "la", 0)]
    known = grid.main(["--data", "device", "--tasks", "mux", "--models", "prism,la", "--steps", "3",
                       "--budget-s", "0.000001", "--out-dir", str(tmp_path / "none")])
    assert known == {}


@pytest.mark.slow
def test_deadline_raises_budget_exceeded():
    cfg = ProbeConfig(task="mux", **(SMALL | {"steps": 4}))
    with pytest.raises(BudgetExceeded):
        train_and_evaluate_on_device([cfg], model=_LocalModel(), steps_per_call=2, deadline=0.0)


def test_each_run_gets_its_own_tasks_batches():
    """Runs of several tasks in one group: run i's batch comes from run i's task and seed."""
    import jax
    import numpy as np

    from train.probing.device import _batches_fn, _stream_keys
    from train.probing.tasks import PARITY, oracle_answers

    cfgs = [ProbeConfig(task=t, seed=s, **SMALL) for t, s in (("mux", 0), ("parity", 0), ("mux", 1))]
    batch = jax.jit(lambda keys: _batches_fn(cfgs, 4)(keys, 3))(_stream_keys(cfgs, 0))
    tokens, targets, mask = (np.asarray(batch[k]) for k in ("tokens", "targets", "mask"))
    assert tokens.shape == (3, 4, 128)
    for run, cfg in enumerate(cfgs):
        assert ((tokens[run] == PARITY).sum(axis=1) == (1 if cfg.task == "parity" else 0)).all()
        for row in range(4):
            got = {int(p): int(targets[run, row, p]) for p in np.nonzero(mask[run, row])[0]}
            assert got == oracle_answers(cfg.task, tokens[run, row])
    assert (tokens[0] != tokens[2]).any()  # same task, other seed: other samples
