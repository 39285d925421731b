"""Generation with a recurrent cache, for every mixer.

    logits, cache = prefill(model, params, tokens)          # chunk form over the prompt
    logits, cache = decode_step(model, params, token, cache) # one token, jitted once per config
    out = generate(model, params, prompt, max_new_tokens, rng, temperature=1.0, top_k=None)

The cache is a pytree {"index": int32 (tokens seen), "layers": [one dict per block]}. PRISM, GDN and GLA
keep a conv window and one K x V state per head (constant memory per token); TTT keeps its inner weights
and the open mini-batch's gradient sums; attention keeps a KV cache of config.max_seq_len tokens.
Each prompt row is one document starting at position 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def _prefill_fn(model):
    return jax.jit(lambda params, tokens: model.apply(params, tokens, model.config.max_seq_len,
                                                      method=model.prefill))


@functools.lru_cache(maxsize=None)
def _decode_fn(model):
    donate = () if jax.default_backend() == "cpu" else (2,)  # CPU cannot reuse donated buffers
    return jax.jit(lambda params, token, cache: model.apply(params, token, cache, method=model.decode),
                   donate_argnums=donate)


def prefill(model, params, tokens):
    """tokens [B, T0] int -> (logits [B, T0, vocab] float32, cache)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"prefill: `tokens` has shape {tokens.shape}, expected [B, T0] with T0 >= 1")
    if model.config.mixer == "attention" and tokens.shape[1] > model.config.max_seq_len:
        raise ValueError(f"prefill: prompt length {tokens.shape[1]} exceeds config.max_seq_len = "
                         f"{model.config.max_seq_len} (the attention KV cache length)")
    return _prefill_fn(model)(params, tokens)


def decode_step(model, params, token, cache):
    """token [B] int (the next input token) -> (logits [B, vocab] float32, cache advanced by one).

    On accelerators the input cache is donated (its buffers are reused): keep using the returned one."""
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise ValueError(f"decode_step: `token` has shape {token.shape}, expected [B]")
    return _decode_fn(model)(params, token, cache)


def _sample(logits, rng, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def generate(model, params, prompt, max_new_tokens, rng, temperature=1.0, top_k=None):
    """Sample max_new_tokens continuations of prompt [B, T0]; returns [B, T0 + max_new_tokens] int32.
    temperature = 0 is greedy decoding; top_k keeps the k most likely tokens."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"generate: `max_new_tokens` is {max_new_tokens!r}, expected an int >= 0")
    if temperature < 0:
        raise ValueError(f"generate: `temperature` is {temperature}, expected >= 0")
    if top_k is not None and not (1 <= top_k <= model.config.vocab_size):
        raise ValueError(f"generate: `top_k` is {top_k}, expected None or 1..vocab_size")
    total = prompt.shape[1] + max_new_tokens
    if model.config.mixer == "attention" and total > model.config.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {total} exceeds config.max_seq_len = "
                         f"{model.config.max_seq_len} (the attention KV cache length)")
    if max_new_tokens == 0:
        return prompt
    logits, cache = prefill(model, params, prompt)
    out = [prompt]
    last = logits[:, -1]
    for i in range(max_new_tokens):
        token = _sample(last, jax.random.fold_in(rng, i), temperature, top_k).astype(jnp.int32)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            last, cache = decode_step(model, params, token, cache)
    return jnp.concatenate(out, axis=1)
