"""The on-device (jax.random) task generators against the plain-Python oracles of tasks.py."""

import collections

import jax
import numpy as np
import pytest

from train.probing.jax_tasks import make_batch_jax
from train.probing.tasks import NUM_CONTROL, TASK_NAMES, _layout, chance_level, oracle_answers

N = 128


@pytest.fixture(scope="module")
def batches():
    """N sequences per task from one jitted call (one compile for all nine generators)."""
    fn = jax.jit(lambda key: {t: make_batch_jax(t, jax.random.fold_in(key, i), N) for i, t in enumerate(TASK_NAMES)})
    return {t: {k: np.asarray(v) for k, v in b.items()} for t, b in fn(jax.random.key(7)).items()}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_answer_matches_the_oracle(batches, task):
    b = batches[task]
    assert b["tokens"].shape == b["targets"].shape == b["mask"].shape == (N, 128)
    for tokens, targets, mask in zip(b["tokens"], b["targets"], b["mask"]):
        expected = oracle_answers(task, tokens)
        assert {int(p): int(targets[p]) for p in np.nonzero(mask)[0]} == expected
        assert expected and not targets[~mask].any()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_tokens_in_range_and_answers_spread(batches, task):
    b, lay = batches[task], _layout(64)
    assert b["tokens"].min() >= 0 and b["tokens"].max() < 64
    noise = b["tokens"] >= lay.noise_start
    assert 0.8 < noise.mean() < 1.0  # mostly background filler, never all of it
    answers = collections.Counter(b["targets"][b["mask"]].tolist())
    # no constant answer wins much more often than the documented chance level (loose: N samples)
    assert max(answers.values()) / sum(answers.values()) < chance_level(task) + 0.12
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
