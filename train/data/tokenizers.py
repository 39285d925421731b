"""Tokenizers: byte-level (default, needs no files) and SentencePiece (optional dependency).

Both map `bytes` of a UTF-8 document to a 1-D int32 array of ids in [0, vocab_size) and back.
`token_byte_lengths()` gives, per id, how many bytes of text it stands for; evaluation uses it to
turn a loss in nats per token into bits per byte.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: bytes) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def token_byte_lengths(self) -> np.ndarray: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """Ids are the raw bytes: vocab 256, one byte per token."""

    vocab_size = 256

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return np.frombuffer(text, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer ids must be in [0, 255], got range [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones((self.vocab_size,), np.int32)

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte"}


class SentencePieceTokenizer:
    """A trained SentencePiece model file. `sentencepiece` is imported only when this is built."""

    def __init__(self, model_file: str | pathlib.Path):
        model_file = pathlib.Path(model_file)
        if not model_file.is_file():
            raise ValueError(f"tokenizer model file {model_file} does not exist")
        try:
            import sentencepiece  # noqa: PLC0415  (optional dependency)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "a SentencePiece tokenizer was requested but `sentencepiece` is not installed: "
                "pip install sentencepiece"
            ) from e
        self.model_file = model_file.resolve()
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros((self.vocab_size,), np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):
                lengths[i] = 1
                continue
            lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def spec(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.model_file.read_bytes()).hexdigest()
        return {"kind": "sentencepiece", "model_file": str(self.model_file), "sha256": digest}


def make_tokenizer(name: str) -> ByteTokenizer | SentencePieceTokenizer:
    """'byte' -> ByteTokenizer; a path to a `.model` file -> SentencePieceTokenizer."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer must be 'byte' or a SentencePiece model path, got {name!r}")
    if name == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(name)


def tokenizer_from_spec(spec: dict[str, Any]) -> ByteTokenizer | SentencePieceTokenizer:
    """Rebuilds the tokenizer recorded in a prepared data directory's metadata."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(spec["model_file"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in data metadata (expected 'byte' or 'sentencepiece')")
