"""The nine mechanistic probing tasks of the PRISM paper (section 5.5, Appendix H, Algorithm 2, Table 6).

Every task is a seeded generator of token sequences plus a loss mask that marks the answer
position(s), and a plain-Python oracle that recomputes the answers from the tokens alone.

Conventions (shared by all tasks):
  * `targets[b, t]` is the answer the model must emit after reading `tokens[b, :t+1]` (a classifier
    on the hidden state at t, not a shifted next-token target); it is only scored where `mask` is True.
  * Vocabulary separation (Appendix H.1): the vocabulary is split into disjoint sets
        control  0 .. 11                      NULL, QUERY, ASSIGN, the operator tokens, ON/OFF, contexts
        data     12 .. V - V//4 - 1           "numerals": data token 12 + i stands for the integer i
        noise    V - V//4 .. V - 1            background filler, never part of a task
    With V = 64: 36 numerals (0..35) and 16 noise tokens. Memory tasks draw keys / variable names from
    the lower half of the numerals and values from the upper half so the roles never collide.
  * Every position that no task block occupies holds a uniformly random noise token.
  * Memory and gating tasks (MQAR, Poly-Recall, Variable Tracking, Silence Gate) scatter their facts
    over the sequence and query at the end. Logic and structure tasks (Local XOR, N-bit Parity, Modulo
    Add, Palindrome, MUX) put one operand block at a random position and ask for the answer at the
    block's closing operator token, so the operands lie inside the ShortConv window (Appendix H,
    "Implementation Note").
  * Chance level: the accuracy of the best constant answer (a guess that ignores the input), computed
    exactly from the generator's answer distribution; `chance_level(task)` returns it.

Task-specific choices where Algorithm 2 leaves freedom are documented on each generator.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

NULL, QUERY, ASSIGN, XOR, PARITY, MODADD, PALIN, MUX, ON, OFF, CTX_A, CTX_B = range(12)
NUM_CONTROL = 12
MIN_VOCAB = 48
MODULUS = 16  # Modulo Add: a, b in [0, 16); chance 1/16 = 0.0625 (the paper's LA/MoM sit at 0.06-0.07).


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Token id ranges for a vocabulary of size `vocab` (see module docstring)."""

    vocab: int

    @property
    def num_noise(self) -> int:
        return self.vocab // 4

    @property
    def num_data(self) -> int:
        return self.vocab - NUM_CONTROL - self.num_noise

    @property
    def noise_start(self) -> int:
        return self.vocab - self.num_noise

    @property
    def num_keys(self) -> int:
        """Numerals 0 .. num_keys-1 serve as keys / variable names; the rest as values."""
        return self.num_data // 2

    @property
    def num_values(self) -> int:
        return self.num_data - self.num_keys

    def numeral(self, i) -> int:
        return NUM_CONTROL + int(i)

    def value_of(self, token: int) -> int:
        """Integer a data token stands for (the inverse of `numeral`)."""
        return int(token) - NUM_CONTROL

    def is_data(self, token: int) -> bool:
        return NUM_CONTROL <= token < self.noise_start

    def is_key(self, token: int) -> bool:
        return self.is_data(token) and self.value_of(token) < self.num_keys

    def is_value(self, token: int) -> bool:
        return self.is_data(token) and self.value_of(token) >= self.num_keys


# ----------------------------------------------------------------------------------------------
# helpers


def _noise(rng: np.random.Generator, lay: VocabLayout, seq_len: int) -> np.ndarray:
    return rng.integers(lay.noise_start, lay.vocab, size=seq_len).astype(np.int32)


def _scatter_starts(rng: np.random.Generator, region_len: int, block_lens) -> list[int]:
    """Uniformly random non-overlapping start positions (in the given block order) inside
    [0, region_len) for blocks of the given lengths."""
    n = len(block_lens)
    free = region_len - sum(block_lens)
    if free < 0:
        raise ValueError(f"blocks of total length {sum(block_lens)} do not fit into {region_len} tokens")
    cuts = np.sort(rng.choice(free + n, size=n, replace=False))
    starts, used = [], 0
    for i, c in enumerate(cuts):
        starts.append(int(c) - i + used)
        used += block_lens[i]
    return starts


def _sample_keys(rng, lay, n):
    return [lay.numeral(i) for i in rng.choice(lay.num_keys, size=n, replace=False)]


def _sample_values(rng, lay, n, replace=True):
    return [lay.numeral(lay.num_keys + i) for i in rng.choice(lay.num_values, size=n, replace=replace)]


class _Sample:
    """One sequence under construction: tokens, answer targets and the loss mask."""

    def __init__(self, rng, lay, seq_len):
        self.tokens = _noise(rng, lay, seq_len)
        self.targets = np.zeros(seq_len, np.int32)
        self.mask = np.zeros(seq_len, bool)

    def put(self, start, block):
        self.tokens[start:start + len(block)] = block

    def answer(self, pos, token):
        self.targets[pos] = token
        self.mask[pos] = True


# ----------------------------------------------------------------------------------------------
# Type I: associative memory (storage)


def gen_mqar(rng, lay, seq_len, num_pairs=4, num_queries=2):
    """MQAR. `num_pairs` pairs [k, v] (distinct keys, values with replacement) at random positions in
    the context; then `num_queries` queries [QUERY, k] at the end (distinct keys). Answer at each
    queried k: its value. Chance 1 / num_values."""
    s = _Sample(rng, lay, seq_len)
    keys, values = _sample_keys(rng, lay, num_pairs), _sample_values(rng, lay, num_pairs)
    ctx = seq_len - 2 * num_queries
    for start, (k, v) in zip(_scatter_starts(rng, ctx, [2] * num_pairs), zip(keys, values)):
        s.put(start, [k, v])
    for j, i in enumerate(rng.choice(num_pairs, size=num_queries, replace=False)):
        pos = ctx + 2 * j
        s.put(pos, [QUERY, keys[i]])
        s.answer(pos + 1, values[i])
    return s


def oracle_mqar(tokens, lay):
    memory, answers = {}, {}
    for t in range(len(tokens) - 1):
        if tokens[t] == QUERY:
            answers[t + 1] = memory[tokens[t + 1]]
        elif lay.is_key(tokens[t]) and lay.is_value(tokens[t + 1]) and (t == 0 or tokens[t - 1] != QUERY):
            memory[tokens[t]] = tokens[t + 1]
    return answers


def gen_poly_recall(rng, lay, seq_len, num_keys=2):
    """Poly-Recall (contextual disambiguation). Each of `num_keys` keys has one value under context
    CTX_A and a different value under CTX_B; the 2 * num_keys triples [C, k, v] are scattered in random
    order. Query at the end: [QUERY, C, k]; answer at k: the value of k under C. Chance 1 / num_values."""
    s = _Sample(rng, lay, seq_len)
    keys = _sample_keys(rng, lay, num_keys)
    triples = []
    for k in keys:
        va, vb = _sample_values(rng, lay, 2, replace=False)
        triples += [(CTX_A, k, va), (CTX_B, k, vb)]
    order = rng.permutation(len(triples))
    triples = [triples[i] for i in order]
    ctx = seq_len - 3
    for start, tri in zip(_scatter_starts(rng, ctx, [3] * len(triples)), triples):
        s.put(start, list(tri))
    c, k, v = triples[rng.integers(len(triples))]
    s.put(ctx, [QUERY, c, k])
    s.answer(ctx + 2, v)
    return s


def oracle_poly_recall(tokens, lay):
    memory, answers = {}, {}
    for t in range(len(tokens) - 2):
        if tokens[t] == QUERY:
            answers[t + 2] = memory[(tokens[t + 1], tokens[t + 2])]
        elif tokens[t] in (CTX_A, CTX_B) and (t == 0 or tokens[t - 1] != QUERY):
            memory[(tokens[t], tokens[t + 1])] = tokens[t + 2]
    return answers


def gen_variable_tracking(rng, lay, seq_len, num_chains=2, chain_len=3):
    """Variable Tracking (pointer chains). Each chain is `a = val, b = a, c = b` (chain_len assignments
    [x, ASSIGN, y]); `num_chains` chains with distinct variable names and distinct values are
    interleaved at random positions, each chain's assignments in program order. Query at the end:
    [QUERY, c] for the last variable of one chain; answer at c: the chain's value.
    One chain alone would make the answer the only value token in the sequence, so a second chain is
    the distractor the pointer must be followed past. Chance 1 / num_values."""
    s = _Sample(rng, lay, seq_len)
    names = _sample_keys(rng, lay, num_chains * chain_len)
    vals = _sample_values(rng, lay, num_chains, replace=False)
    chains = []
    for c in range(num_chains):
        var = names[c * chain_len:(c + 1) * chain_len]
        chains.append([[var[0], ASSIGN, vals[c]]] + [[var[i], ASSIGN, var[i - 1]] for i in range(1, chain_len)])
    owner = rng.permutation(np.repeat(np.arange(num_chains), chain_len))
    next_idx = [0] * num_chains
    assignments = []
    for c in owner:
        assignments.append(chains[c][next_idx[c]])
        next_idx[c] += 1
    ctx = seq_len - 2
    for start, a in zip(_scatter_starts(rng, ctx, [3] * len(assignments)), assignments):
        s.put(start, a)
    c = int(rng.integers(num_chains))
    s.put(ctx, [QUERY, names[c * chain_len + chain_len - 1]])
    s.answer(ctx + 1, vals[c])
    return s


def oracle_variable_tracking(tokens, lay):
    env, answers = {}, {}
    for t in range(len(tokens) - 1):
        if tokens[t] == QUERY:
            answers[t + 1] = env[tokens[t + 1]]
        elif t + 2 < len(tokens) and tokens[t + 1] == ASSIGN:
            rhs = tokens[t + 2]
            env[tokens[t]] = rhs if lay.is_value(rhs) else env[rhs]
    return answers


# ----------------------------------------------------------------------------------------------
# Type II: non-linear logic (reasoning) and structure


def _local_block(rng, lay, seq_len, operands, op, answer):
    s = _Sample(rng, lay, seq_len)
    start = int(rng.integers(0, seq_len - len(operands)))
    s.put(start, list(operands) + [op])
    s.answer(start + len(operands), lay.numeral(answer))
    return s


def gen_local_xor(rng, lay, seq_len):
    """Local XOR. a, b uniform numerals; block [a, b, XOR]; answer at XOR: 1 if a and b have different
    parity else 0 (as numerals). Chance 0.5."""
    a, b = rng.integers(lay.num_data, size=2)
    return _local_block(rng, lay, seq_len, [lay.numeral(a), lay.numeral(b)], XOR, int(a % 2 != b % 2))


def oracle_local_xor(tokens, lay):
    return {t: lay.numeral(int(lay.value_of(tokens[t - 2]) % 2 != lay.value_of(tokens[t - 1]) % 2))
            for t in range(2, len(tokens)) if tokens[t] == XOR}


def gen_parity(rng, lay, seq_len, num_bits=3):
    """N-bit Parity. `num_bits` bits (numerals 0/1) in a contiguous block [b1 .. bn, PARITY]; answer at
    PARITY: sum(b) mod 2. With n = 3 the block fits a ShortConv window of 4. Chance 0.5."""
    bits = rng.integers(0, 2, size=num_bits)
    return _local_block(rng, lay, seq_len, [lay.numeral(b) for b in bits], PARITY, int(bits.sum() % 2))


def oracle_parity(tokens, lay, num_bits=3):
    return {t: lay.numeral(sum(lay.value_of(x) for x in tokens[t - num_bits:t]) % 2)
            for t in range(num_bits, len(tokens)) if tokens[t] == PARITY}


def gen_modulo_add(rng, lay, seq_len, modulus=MODULUS):
    """Modulo Add. a, b uniform in [0, modulus); block [a, b, MODADD]; answer at MODADD: (a + b) mod
    modulus (a numeral). Chance 1 / modulus."""
    a, b = rng.integers(0, modulus, size=2)
    return _local_block(rng, lay, seq_len, [lay.numeral(a), lay.numeral(b)], MODADD, int((a + b) % modulus))


def oracle_modulo_add(tokens, lay, modulus=MODULUS):
    return {t: lay.numeral((lay.value_of(tokens[t - 2]) + lay.value_of(tokens[t - 1])) % modulus)
            for t in range(2, len(tokens)) if tokens[t] == MODADD}


def gen_palindrome(rng, lay, seq_len):
    """Palindrome. a, b uniform numerals; with probability 1/2 c = a, otherwise c uniform among the
    numerals != a; block [a, b, c, PALIN]; answer at PALIN: 1 if a == c else 0. Chance 0.5."""
    a, b = rng.integers(lay.num_data, size=2)
    if rng.random() < 0.5:
        c = a
    else:
        c = (a + 1 + rng.integers(lay.num_data - 1)) % lay.num_data
    return _local_block(rng, lay, seq_len, [lay.numeral(x) for x in (a, b, c)], PALIN, int(a == c))


def oracle_palindrome(tokens, lay):
    return {t: lay.numeral(int(tokens[t - 3] == tokens[t - 1])) for t in range(3, len(tokens)) if tokens[t] == PALIN}


# ----------------------------------------------------------------------------------------------
# Type III: gating and control


def gen_silence_gate(rng, lay, seq_len, num_triples=1):
    """Silence Gate. `num_triples` triples [T, k, v] (distinct keys, T = ON or OFF with probability
    1/2 each) at random positions; query [QUERY, k] at the end for one of them; answer at k: v if its
    trigger was ON, else NULL (token 0). Chance 0.5 (always answer NULL)."""
    s = _Sample(rng, lay, seq_len)
    keys, values = _sample_keys(rng, lay, num_triples), _sample_values(rng, lay, num_triples)
    triggers = [ON if rng.random() < 0.5 else OFF for _ in range(num_triples)]
    ctx = seq_len - 2
    for start, tri in zip(_scatter_starts(rng, ctx, [3] * num_triples), zip(triggers, keys, values)):
        s.put(start, list(tri))
    i = int(rng.integers(num_triples))
    s.put(ctx, [QUERY, keys[i]])
    s.answer(ctx + 1, values[i] if triggers[i] == ON else NULL)
    return s


def oracle_silence_gate(tokens, lay):
    memory, answers = {}, {}
    for t in range(len(tokens) - 2):
        if tokens[t] in (ON, OFF):
            memory[tokens[t + 1]] = tokens[t + 2] if tokens[t] == ON else NULL
    for t in range(len(tokens) - 1):
        if tokens[t] == QUERY:
            answers[t + 1] = memory[tokens[t + 1]]
    return answers


def gen_mux(rng, lay, seq_len):
    """MUX (multiplexer). Selector S in {0, 1} (numerals), two distinct channel values ch0, ch1;
    block [S, ch0, ch1, MUX]; answer at MUX: ch_S. Chance 1 / num_values (the answer is uniform over
    the values)."""
    sel = int(rng.integers(2))
    ch = _sample_values(rng, lay, 2, replace=False)
    s = _Sample(rng, lay, seq_len)
    start = int(rng.integers(0, seq_len - 3))
    s.put(start, [lay.numeral(sel), ch[0], ch[1], MUX])
    s.answer(start + 3, ch[sel])
    return s


def oracle_mux(tokens, lay):
    return {t: tokens[t - 2 + lay.value_of(tokens[t - 3])] for t in range(3, len(tokens)) if tokens[t] == MUX}


# ----------------------------------------------------------------------------------------------
# registry and batch API


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    category: str  # "memory" | "logic" | "structure" | "control" (Table 4's rows)
    generate: Callable
    oracle: Callable
    chance: Callable[[VocabLayout], float]
    min_seq_len: int


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mqar", "memory", gen_mqar, oracle_mqar, lambda lay: 1 / lay.num_values, 16),
    Task("poly_recall", "memory", gen_poly_recall, oracle_poly_recall, lambda lay: 1 / lay.num_values, 16),
    Task("variable_tracking", "memory", gen_variable_tracking, oracle_variable_tracking,
         lambda lay: 1 / lay.num_values, 24),
    Task("parity", "logic", gen_parity, oracle_parity, lambda lay: 0.5, 8),
    Task("local_xor", "logic", gen_local_xor, oracle_local_xor, lambda lay: 0.5, 8),
    Task("modulo_add", "structure", gen_modulo_add, oracle_modulo_add, lambda lay: 1 / MODULUS, 8),
    Task("palindrome", "structure", gen_palindrome, oracle_palindrome, lambda lay: 0.5, 8),
    Task("mux", "control", gen_mux, oracle_mux, lambda lay: 1 / lay.num_values, 8),
    Task("silence_gate", "control", gen_silence_gate, oracle_silence_gate, lambda lay: 0.5, 8),
)}
TASK_NAMES = tuple(TASKS)

# Table 4's labels, for the results table.
PAPER_LABELS = {
    "mqar": "MQAR", "poly_recall": "Poly-Recall", "variable_tracking": "Var. Tracking",
    "parity": "Parity Check", "local_xor": "Local XOR", "modulo_add": "Modulo Add",
    "palindrome": "Palindrome", "mux": "MUX Logic", "silence_gate": "Silence Gate",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")
    return TASKS[name]


def chance_level(task: str, vocab: int = 64) -> float:
    """Accuracy of the best constant answer for `task` (see module docstring)."""
    return float(get_task(task).chance(_layout(vocab)))


def _layout(vocab: int) -> VocabLayout:
    if not isinstance(vocab, (int, np.integer)) or vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be an int >= {MIN_VOCAB} (control + data + noise tokens), got {vocab!r}")
    return VocabLayout(int(vocab))


def make_batch(task: str, rng_or_seed, batch_size: int, seq_len: int = 128, vocab: int = 64) -> dict:
    """A batch of `task` samples.

    Args:
      task: one of TASK_NAMES.
      rng_or_seed: an int seed or a `np.random.Generator` (advanced in place).
      batch_size: B >= 1.
      seq_len: T (each task has a small minimum; the paper uses 128).
      vocab: V >= 48 (the paper uses 64).

    Returns:
      dict(tokens [B, T] int32, targets [B, T] int32, mask [B, T] bool); targets are 0 where mask is False.
    """
    spec = get_task(task)
    lay = _layout(vocab)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < spec.min_seq_len:
        raise ValueError(f"seq_len must be an int >= {spec.min_seq_len} for task {task!r}, got {seq_len!r}")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    samples = [spec.generate(rng, lay, int(seq_len)) for _ in range(batch_size)]
    return {
        "tokens": np.stack([s.tokens for s in samples]),
        "targets": np.stack([s.targets for s in samples]),
        "mask": np.stack([s.mask for s in samples]),
    }


def oracle_answers(task: str, tokens, vocab: int = 64) -> dict[int, int]:
    """The oracle for one sequence: {answer position: answer token}, computed from the tokens alone."""
    return get_task(task).oracle([int(x) for x in tokens], _layout(vocab))
