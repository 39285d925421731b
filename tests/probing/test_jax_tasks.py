"""The on-device (jax.random) task generators against the plain-Python oracles of tasks.py."""

import collections

import jax
import numpy as np
import pytest

from train.probing.jax_tasks import make_batch_jax
from train.probing.tasks import NUM_CONTROL, TASK_NAMES, _layout, chance_level, oracle_answers

N = 128


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generator_matches_the_oracle_and_the_layout(task):
    """N sequences of one task (one compile per task): every answer is the oracle's, tokens lie in the
    vocabulary layout, and no constant answer wins much more often than the documented chance."""
    key = jax.random.fold_in(jax.random.key(7), TASK_NAMES.index(task))
    b = {k: np.asarray(v) for k, v in jax.jit(lambda k: make_batch_jax(task, k, N))(key).items()}
    assert b["tokens"].shape == b["targets"].shape == b["mask"].shape == (N, 128)
    for tokens, targets, mask in zip(b["tokens"], b["targets"], b["mask"]):
        expected = oracle_answers(task, tokens)
        assert {int(p): int(targets[p]) for p in np.nonzero(mask)[0]} == expected
        assert expected and not targets[~mask].any()

    lay = _layout(64)
    assert b["tokens"].min() >= 0 and b["tokens"].max() < 64
    noise = b["tokens"] >= lay.noise_start
    assert 0.8 < noise.mean() < 1.0  # mostly background filler, never all of it
    answers = collections.Counter(b["targets"][b["mask"]].tolist())
    assert max(answers.values()) / sum(answers.values()) < chance_level(task) + 0.12  # loose: N samples
    assert all(a == 0 or a >= NUM_CONTROL for a in answers)


def test_same_key_same_batch_other_key_other_batch():
    make = jax.jit(lambda key: make_batch_jax("mqar", key, 4))
    a, b, c = make(jax.random.key(3)), make(jax.random.key(3)), make(jax.random.key(4))
    assert (np.asarray(a["tokens"]) == np.asarray(b["tokens"])).all()
    assert (np.asarray(a["tokens"]) != np.asarray(c["tokens"])).any()


@pytest.mark.parametrize("bad, match", [(dict(task="nope"), "task must be one of"),
                                        (dict(batch_size=0), "batch_size"), (dict(seq_len=4), "seq_len"),
                                        (dict(vocab=20), "vocab")])
def test_bad_arguments_raise(bad, match):
    kwargs = dict(task="mux", key=jax.random.key(0), batch_size=2) | bad
    with pytest.raises(ValueError, match=match):
        make_batch_jax(**kwargs)
