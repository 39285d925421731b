"""Shared fixtures for the training-stack tests: small prepared corpora in temporary directories."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import prepare as prepare_lib


def write_documents(directory, num_docs: int, seed: int = 0, min_len: int = 5, max_len: int = 90):
    """`num_docs` distinct random text files; returns their paths."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz _\n():=", np.uint8)
    for i in range(num_docs):
        body = rng.choice(alphabet, size=int(rng.integers(min_len, max_len))).tobytes()
        path = directory / f"doc{i:03d}.txt"
        path.write_bytes(f"#{i}\n".encode() + body)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared byte-level corpus of 60 random documents (validation: ~30% of them)."""
    root = tmp_path_factory.mktemp("corpus")
    files = write_documents(root / "text", 60)
    data_dir = root / "prepared"
    meta = prepare_lib.prepare(data_dir, files=files, val_permille=300, num_shards=3)
    return data_dir, files, meta
