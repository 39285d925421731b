"""Prefill + token-by-token decode equals one forward pass (float32, every mixer, odd lengths);
the public generate / decode_step API."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import generation
from prism_jax.models import MIXERS, PrismLM, PrismLMConfig

TINY = PrismLMConfig(vocab_size=32, d_model=32, num_layers=1, num_heads=2, head_k_dim=16, mlp_hidden_dim=64,
                     solver_steps=2, chunk_size=4, ttt_mini_batch=3, max_seq_len=16)
T, PREFIX = 11, 5  # the prefix ends inside a chunk and inside a TTT mini-batch


@functools.lru_cache(maxsize=None)
def _full_vs_decoded(mixer):
    """One jit: the full forward, prefill of PREFIX tokens and a scan of decode steps."""
    model = PrismLM(dataclasses.replace(TINY, mixer=mixer))
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, TINY.vocab_size)

    @jax.jit
    def run(params):
        full = model.apply(params, tokens)
        logits, cache = model.apply(params, tokens[:, :PREFIX], TINY.max_seq_len, method=model.prefill)

        def step(cache, token):
            out, cache = model.apply(params, token, cache, method=model.decode)
            return cache, out

        cache, decoded = jax.lax.scan(step, cache, tokens[:, PREFIX:].T)
        return full, jnp.concatenate([logits, jnp.swapaxes(decoded, 0, 1)], axis=1), cache["index"]

    return jax.device_get(run(model.init(jax.random.key(1), tokens[:, :1])))


@pytest.mark.parametrize("mixer", MIXERS)
def test_prefill_then_decode_equals_full_forward(mixer):
    full, decoded, index = _full_vs_decoded(mixer)
    assert full.shape == decoded.shape == (2, T, TINY.vocab_size) and full.dtype == np.float32
    assert int(index) == T
    np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=2e-5)


def test_generate_greedy_matches_argmax_of_full_forward():
    # the API around prefill / decode (each mixer's cache is tested above); attention compiles fastest
    model = PrismLM(dataclasses.replace(TINY, mixer="attention"))
    prompt = jax.random.randint(jax.random.key(2), (2, 3), 0, TINY.vocab_size)
    params = model.init(jax.random.key(3), prompt)
    out = generation.generate(model, params, prompt, 4, jax.random.key(4), temperature=0.0)
    assert out.shape == (2, 7) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :3], prompt)
    # each generated token is the argmax of the full forward over everything before it
    full = jax.jit(model.apply)(params, out)
    np.testing.assert_array_equal(out[:, 3:], np.argmax(full[:, 2:-1], axis=-1))
    sampled = generation.generate(model, params, prompt, 4, jax.random.key(5), temperature=1.0, top_k=3)
    assert sampled.shape == (2, 7) and (np.asarray(sampled) < TINY.vocab_size).all()
    # decode_step is compiled once per model config
    assert generation._decode_fn.cache_info().currsize >= 1
    before = generation._decode_fn(model)._cache_size()
    generation.generate(model, params, prompt, 3, jax.random.key(6))
    assert generation._decode_fn(model)._cache_size() == before


def test_generation_rejects_bad_arguments():
    model = PrismLM(dataclasses.replace(TINY, mixer="attention"))
    prompt = jnp.zeros((1, 10), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), prompt)
    with pytest.raises(ValueError, match="max_seq_len"):
        generation.generate(model, params, prompt, 7, jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        generation.generate(model, params, prompt, 1, jax.random.key(0), top_k=0)
    with pytest.raises(ValueError, match="token"):
        generation.decode_step(model, params, jnp.zeros((1, 1), jnp.int32), {})
