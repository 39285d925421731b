"""The nine probing tasks as jit-able JAX generators, so training data is made on the accelerator.

Same task definitions, vocabulary layout and answer conventions as `train/probing/tasks.py` (read its
docstrings); only the random stream differs (`jax.random` instead of numpy), so a numpy batch and a
JAX batch of the same seed are different samples of the same distribution. Every generated sequence
is checked against the numpy module's plain-Python oracles in `tests/probing/test_jax_tasks.py`.

    batch = make_batch_jax("mqar", jax.random.key(0), batch_size=32)   # tokens/targets [B, T] int32, mask bool
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from train.probing.tasks import (ASSIGN, CTX_A, CTX_B, MODADD, MODULUS, MUX, NULL, NUM_CONTROL, OFF, ON, PALIN,
                                 PARITY, QUERY, XOR, _layout, get_task)


def _noise(key, lay, seq_len):
    return jax.random.randint(key, (seq_len,), lay.noise_start, lay.vocab, jnp.int32)


def _scatter_starts(key, region_len, num_blocks, block_len):
    """Uniformly random non-overlapping starts [n] (in block order) in [0, region_len) for n blocks of
    one length: n distinct sorted cuts among free + n slots, as in the numpy generator."""
    free = region_len - num_blocks * block_len
    if free < 0:
        raise ValueError(f"{num_blocks} blocks of {block_len} tokens do not fit into {region_len} tokens")
    cuts = jnp.sort(jax.random.choice(key, free + num_blocks, (num_blocks,), replace=False))
    idx = jnp.arange(num_blocks)
    return cuts - idx + idx * block_len


def _put(tokens, starts, blocks):
    """Write blocks [n, l] at starts [n] into tokens [T]."""
    pos = starts[:, None] + jnp.arange(blocks.shape[1])[None, :]
    return tokens.at[pos.reshape(-1)].set(blocks.reshape(-1).astype(jnp.int32))


def _sample(tokens, answer_pos, answers):
    """(tokens, targets, mask) with answers [m] at answer_pos [m]."""
    seq_len = tokens.shape[0]
    targets = jnp.zeros(seq_len, jnp.int32).at[answer_pos].set(answers.astype(jnp.int32))
    mask = jnp.zeros(seq_len, bool).at[answer_pos].set(True)
    return tokens, targets, mask


def _keys(key, lay, n):
    return NUM_CONTROL + jax.random.choice(key, lay.num_keys, (n,), replace=False)


def _values(key, lay, n, replace=True):
    return NUM_CONTROL + lay.num_keys + jax.random.choice(key, lay.num_values, (n,), replace=replace)


def gen_mqar(key, lay, seq_len, num_pairs=4, num_queries=2):
    k = jax.random.split(key, 5)
    tokens = _noise(k[0], lay, seq_len)
    keys, values = _keys(k[1], lay, num_pairs), _values(k[2], lay, num_pairs)
    ctx = seq_len - 2 * num_queries
    tokens = _put(tokens, _scatter_starts(k[3], ctx, num_pairs, 2), jnp.stack([keys, values], 1))
    asked = jax.random.choice(k[4], num_pairs, (num_queries,), replace=False)
    qpos = ctx + 2 * jnp.arange(num_queries)
    tokens = _put(tokens, qpos, jnp.stack([jnp.full(num_queries, QUERY), keys[asked]], 1))
    return _sample(tokens, qpos + 1, values[asked])


def gen_poly_recall(key, lay, seq_len, num_keys=2):
    k = jax.random.split(key, 6)
    tokens = _noise(k[0], lay, seq_len)
    keys = _keys(k[1], lay, num_keys)
    vals = jax.vmap(lambda kk: _values(kk, lay, 2, replace=False))(jax.random.split(k[2], num_keys))  # [n, 2]
    triples = jnp.stack([jnp.tile(jnp.array([CTX_A, CTX_B]), num_keys), jnp.repeat(keys, 2), vals.reshape(-1)], 1)
    triples = triples[jax.random.permutation(k[3], 2 * num_keys)]
    ctx = seq_len - 3
    tokens = _put(tokens, _scatter_starts(k[4], ctx, 2 * num_keys, 3), triples)
    c, kk, v = triples[jax.random.randint(k[5], (), 0, 2 * num_keys)]
    tokens = _put(tokens, jnp.array([ctx]), jnp.stack([jnp.int32(QUERY), c, kk])[None])
    return _sample(tokens, jnp.array([ctx + 2]), v[None])


def gen_variable_tracking(key, lay, seq_len, num_chains=2, chain_len=3):
    k = jax.random.split(key, 6)
    tokens = _noise(k[0], lay, seq_len)
    names = _keys(k[1], lay, num_chains * chain_len).reshape(num_chains, chain_len)
    vals = _values(k[2], lay, num_chains, replace=False)
    rhs = jnp.concatenate([vals[:, None], names[:, :-1]], 1)  # [chains, len]: a = val, b = a, c = b
    chains = jnp.stack([names, jnp.full_like(names, ASSIGN), rhs], -1)  # [chains, len, 3]
    owner = jax.random.permutation(k[3], jnp.repeat(jnp.arange(num_chains), chain_len))
    nth = jnp.sum(jnp.tril(owner[:, None] == owner[None, :], -1), axis=1)  # earlier assignments of that chain
    assignments = chains[owner, nth]
    ctx = seq_len - 2
    tokens = _put(tokens, _scatter_starts(k[4], ctx, num_chains * chain_len, 3), assignments)
    c = jax.random.randint(k[5], (), 0, num_chains)
    tokens = _put(tokens, jnp.array([ctx]), jnp.stack([jnp.int32(QUERY), names[c, -1]])[None])
    return _sample(tokens, jnp.array([ctx + 1]), vals[c][None])


def _local_block(key, lay, seq_len, block, answer):
    """block [n + 1] (operands then operator) at a uniform start; answer token at the operator."""
    k0, k1 = jax.random.split(key)
    tokens = _noise(k0, lay, seq_len)
    start = jax.random.randint(k1, (), 0, seq_len - (block.shape[0] - 1))
    tokens = _put(tokens, start[None], block[None])
    return _sample(tokens, (start + block.shape[0] - 1)[None], answer[None])


def gen_local_xor(key, lay, seq_len):
    k0, k1 = jax.random.split(key)
    a, b = jax.random.randint(k0, (2,), 0, lay.num_data)
    return _local_block(k1, lay, seq_len, jnp.stack([NUM_CONTROL + a, NUM_CONTROL + b, jnp.int32(XOR)]),
                        NUM_CONTROL + (a % 2 != b % 2).astype(jnp.int32))


def gen_parity(key, lay, seq_len, num_bits=3):
    k0, k1 = jax.random.split(key)
    bits = jax.random.randint(k0, (num_bits,), 0, 2)
    return _local_block(k1, lay, seq_len, jnp.concatenate([NUM_CONTROL + bits, jnp.array([PARITY])]), NUM_CONTROL + bits.sum() % 2)


def gen_modulo_add(key, lay, seq_len, modulus=MODULUS):
    k0, k1 = jax.random.split(key)
    a, b = jax.random.randint(k0, (2,), 0, modulus)
    return _local_block(k1, lay, seq_len, jnp.stack([NUM_CONTROL + a, NUM_CONTROL + b, jnp.int32(MODADD)]), NUM_CONTROL + (a + b) % modulus)


def gen_palindrome(key, lay, seq_len):
    k0, k1, k2, k3 = jax.random.split(key, 4)
    a, b = jax.random.randint(k0, (2,), 0, lay.num_data)
    other = (a + 1 + jax.random.randint(k2, (), 0, lay.num_data - 1)) % lay.num_data
    c = jnp.where(jax.random.uniform(k1) < 0.5, a, other)
    return _local_block(k3, lay, seq_len, jnp.stack([NUM_CONTROL + a, NUM_CONTROL + b, NUM_CONTROL + c, jnp.int32(PALIN)]),
                        NUM_CONTROL + (a == c).astype(jnp.int32))


def gen_silence_gate(key, lay, seq_len, num_triples=1):
    k = jax.random.split(key, 6)
    tokens = _noise(k[0], lay, seq_len)
    keys, values = _keys(k[1], lay, num_triples), _values(k[2], lay, num_triples)
    triggers = jnp.where(jax.random.uniform(k[3], (num_triples,)) < 0.5, ON, OFF)
    ctx = seq_len - 2
    tokens = _put(tokens, _scatter_starts(k[4], ctx, num_triples, 3), jnp.stack([triggers, keys, values], 1))
    i = jax.random.randint(k[5], (), 0, num_triples)
    tokens = _put(tokens, jnp.array([ctx]), jnp.stack([jnp.int32(QUERY), keys[i]])[None])
    return _sample(tokens, jnp.array([ctx + 1]), jnp.where(triggers[i] == ON, values[i], NULL)[None])


def gen_mux(key, lay, seq_len):
    k0, k1, k2 = jax.random.split(key, 3)
    sel = jax.random.randint(k0, (), 0, 2)
    ch = _values(k1, lay, 2, replace=False)
    return _local_block(k2, lay, seq_len, jnp.stack([NUM_CONTROL + sel, ch[0], ch[1], jnp.int32(MUX)]), ch[sel])


GENERATORS = {
    "mqar": gen_mqar, "poly_recall": gen_poly_recall, "variable_tracking": gen_variable_tracking,
    "parity": gen_parity, "local_xor": gen_local_xor, "modulo_add": gen_modulo_add, "palindrome": gen_palindrome,
    "mux": gen_mux, "silence_gate": gen_silence_gate,
}


def make_batch_jax(task: str, key, batch_size: int, seq_len: int = 128, vocab: int = 64) -> dict:
    """A batch of `task` samples from a `jax.random` key (jit-able; task, sizes static).

    Returns dict(tokens [B, T] int32, targets [B, T] int32, mask [B, T] bool), as `tasks.make_batch`.
    """
    spec = get_task(task)
    lay = _layout(vocab)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < spec.min_seq_len:
        raise ValueError(f"seq_len must be an int >= {spec.min_seq_len} for task {task!r}, got {seq_len!r}")
    gen = functools.partial(GENERATORS[task], lay=lay, seq_len=seq_len)
    tokens, targets, mask = jax.vmap(lambda k: gen(k))(jax.random.split(key, batch_size))
    return {"tokens": tokens, "targets": targets, "mask": mask}
