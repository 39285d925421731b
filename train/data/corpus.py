"""The embedded default corpus: the `.py` files of the running Python's standard library.

Nothing is downloaded and no text ships with the project: the documents are whatever standard
library the interpreter running the code has. Files are split into train and validation by a
hash of their *content*, so identical files (there are many empty-ish `__init__.py`) can never
land on both sides of the split.
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

# Directories skipped inside the stdlib: installed third-party packages and the test suites
# (the tests hold deliberately odd encodings and generated data, not prose-like code).
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

SPLITS = ("train", "val")


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """All non-empty `.py` files of the standard library, sorted by relative path."""
    root = stdlib_root() if root is None else pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"stdlib root {root} is not a directory")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.stat().st_size > 0:
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(content: bytes, val_permille: int) -> str:
    """'val' for about `val_permille`/1000 of documents, chosen by the SHA-256 of their content."""
    if not 0 <= val_permille <= 1000:
        raise ValueError(f"val_permille must be in [0, 1000], got {val_permille}")
    bucket = int.from_bytes(hashlib.sha256(content).digest()[:8], "little") % 1000
    return "val" if bucket < val_permille else "train"


def iter_documents(paths: Sequence[pathlib.Path]) -> Iterator[tuple[pathlib.Path, bytes]]:
    """(path, raw bytes) for each non-empty file; duplicates by content are yielded once."""
    seen = set()
    for path in paths:
        content = pathlib.Path(path).read_bytes()
        if not content:
            continue
        digest = hashlib.sha256(content).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield pathlib.Path(path), content
