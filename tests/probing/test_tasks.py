"""Probing task generators: determinism, oracle agreement, chance levels, argument checks."""

import collections

import numpy as np
import pytest

from train.probing import tasks
from train.probing.tasks import TASK_NAMES, chance_level, make_batch, oracle_answers


@pytest.mark.parametrize("task", TASK_NAMES)
def test_fixed_seed_gives_fixed_samples(task):
    a, b = make_batch(task, 123, 8), make_batch(task, 123, 8)
    c = make_batch(task, 124, 8)
    for key in ("tokens", "targets", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["tokens"], c["tokens"])
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(make_batch(task, rng1, 4)["tokens"], make_batch(task, rng2, 4)["tokens"])
    # A Generator is advanced in place: the next batch differs.
    assert not np.array_equal(make_batch(task, rng1, 4)["tokens"], make_batch(task, 5, 4)["tokens"])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_shapes_dtypes_and_vocab_range(task):
    batch = make_batch(task, 0, 3, seq_len=128, vocab=64)
    assert batch["tokens"].shape == batch["targets"].shape == batch["mask"].shape == (3, 128)
    assert batch["tokens"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == bool
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() < 64
    assert batch["mask"].sum(axis=1).min() >= 1
    assert (batch["targets"][~batch["mask"]] == 0).all()


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("seq_len,vocab", [(128, 64), (48, 48), (96, 100)])
def test_oracle_agrees_with_generator(task, seq_len, vocab):
    batch = make_batch(task, 7, 200, seq_len=seq_len, vocab=vocab)
    for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["mask"]):
        answers = oracle_answers(task, tokens, vocab=vocab)
        assert sorted(answers) == list(np.flatnonzero(mask))
        for pos, ans in answers.items():
            assert targets[pos] == ans


def test_oracle_catches_a_wrong_answer():
    batch = make_batch("modulo_add", 1, 1)
    tokens = batch["tokens"][0].copy()
    pos = int(np.flatnonzero(batch["mask"][0])[0])
    tokens[pos - 1] = tokens[pos - 1] + 1 if tokens[pos - 1] < 12 + 15 else 12  # change operand b
    assert oracle_answers("modulo_add", tokens)[pos] != batch["targets"][0][pos]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_chance_level_matches_best_constant_answer(task):
    batch = make_batch(task, 11, 2500)
    answers = batch["targets"][batch["mask"]]
    best_constant = collections.Counter(answers.tolist()).most_common(1)[0][1] / answers.size
    chance = chance_level(task)
    assert abs(best_constant - chance) < 0.035 + 0.25 * chance, (best_constant, chance)


def test_documented_chance_levels():
    expected = {"mqar": 1 / 18, "poly_recall": 1 / 18, "variable_tracking": 1 / 18, "parity": 0.5,
                "local_xor": 0.5, "modulo_add": 1 / 16, "palindrome": 0.5, "mux": 1 / 18, "silence_gate": 0.5}
    assert set(expected) == set(TASK_NAMES)
    for task, chance in expected.items():
        assert chance_level(task) == pytest.approx(chance)


def test_vocabulary_separation():
    lay = tasks.VocabLayout(64)
    assert (lay.num_data, lay.num_noise, lay.noise_start) == (36, 16, 48)
    for task in TASK_NAMES:
        batch = make_batch(task, 3, 50)
        # Noise fills everything outside the task blocks; answers are never noise tokens.
        assert (batch["targets"][batch["mask"]] < lay.noise_start).all()
        assert (batch["tokens"] >= lay.noise_start).mean() > 0.8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task must be one of"):
        make_batch("nope", 0, 2)
    with pytest.raises(ValueError, match="task must be one of"):
        chance_level("MQAR")
    with pytest.raises(ValueError, match="vocab"):
        make_batch("mqar", 0, 2, vocab=32)
    with pytest.raises(ValueError, match="seq_len"):
        make_batch("variable_tracking", 0, 2, seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch("mqar", 0, 0)
