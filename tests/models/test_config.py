"""Config validation (before any tracing), presets and the parameter counts stated in docs/model.md."""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from prism_jax.models import MIXERS, PRESETS, PrismLM, PrismLMConfig, get_preset
from prism_jax.models.params import count_params

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "model.md"


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(solver_steps=0), "solver_steps"),
    (dict(mixer="mamba"), "mixer"),
    (dict(solver_nonlinearity="relu"), "solver_nonlinearity"),
    (dict(solver_rank=0), "solver_rank"),
    (dict(dtype="float16"), "dtype"),
    (dict(op_impl="fast"), "op_impl"),
    (dict(chunk_size=12), "chunk_size"),
    (dict(use_gain=1), "use_gain"),
    (dict(num_layers=True), "num_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(mixer="attention", d_model=30, num_heads=2), "d_model"),
    (dict(op_impl="pallas", pallas_options="{bwd: xla}"), "pallas_options"),  # not JSON
    (dict(op_impl="pallas", pallas_options='["bwd"]'), "pallas_options"),
    (dict(op_impl="pallas", pallas_options='{"warps": 4}'), "pallas_options"),
    (dict(op_impl="chunk", pallas_options='{"bwd": "xla"}'), "pallas_options"),
    (dict(op_impl="pallas", pallas_options={"bwd": "xla"}), "pallas_options"),  # a dict, not its JSON
    (dict(op_impl="auto", pallas_options='{"warps": 4}'), "pallas_options"),
])
def test_bad_config_raises_before_tracing(overrides, field):
    with pytest.raises(ValueError, match=rf"PrismLMConfig\.{field}"):
        PrismLMConfig(**overrides)
    with pytest.raises(ValueError, match=rf"PrismLMConfig\.{field}"):
        dataclasses.replace(get_preset("tiny"), **overrides)


def test_auto_op_impl_takes_pallas_options():
    config = PrismLMConfig(op_impl="auto", pallas_options='{"bwd": "xla"}')
    assert config.op_impl == "auto" and config.pallas_options == '{"bwd": "xla"}'


def test_presets_and_overrides():
    assert PRESETS == ("tiny", "130m", "370m", "1.3b")
    config = get_preset("130m", mixer="gdn", dtype="bfloat16")
    assert config.mixer == "gdn" and config.dtype == "bfloat16" and config.d_model == 768
    with pytest.raises(ValueError, match="name"):
        get_preset("7b")
    with pytest.raises(ValueError, match="unknown"):
        get_preset("tiny", n_layers=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 1


def _documented_counts():
    rows = re.findall(r"^\|\s*(\S+)\s*\|\s*(\w+)\s*\|\s*([\d,]+)\s*\|", DOCS.read_text(), re.M)
    return {(preset, mixer): int(total.replace(",", "")) for preset, mixer, total in rows}


def test_parameter_counts_match_docs_within_two_percent():
    documented = _documented_counts()
    for preset in PRESETS:
        for mixer in MIXERS:
            got = count_params(get_preset(preset, mixer=mixer))["total"]
            want = documented[(preset, mixer)]
            assert abs(got - want) <= 0.02 * want, f"{preset}/{mixer}: {got:,} vs documented {want:,}"


def test_solver_adds_under_ten_percent_at_130m():
    prism = count_params(get_preset("130m"))["total"]
    gdn = count_params(get_preset("130m", mixer="gdn"))["total"]
    assert gdn < prism < 1.10 * gdn


@pytest.mark.parametrize("mixer", MIXERS)
def test_count_params_equals_the_initialised_model(mixer):
    config = get_preset("tiny", mixer=mixer, tie_embeddings=mixer != "gdn")
    shapes = jax.eval_shape(PrismLM(config).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count_params(config)["total"]
