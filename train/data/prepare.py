"""Text files -> ArrayRecord shards of token ids, split into train and validation by content hash.

    python -m train.data.prepare --output_dir data/stdlib                    # embedded corpus
    python -m train.data.prepare --output_dir data/mine --input docs/ --pattern '*.txt' \
        --tokenizer path/to/spm.model

Writes `<split>-NNNNN-of-MMMMM.array_record` (one record per document: the ids as little-endian
uint16, or int32 when the vocabulary needs it) and `meta.json` (tokenizer, dtype, counts, shards).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from train.data import corpus as corpus_lib
from train.data import tokenizers

META_FILE = "meta.json"


def record_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def collect_input_files(inputs: Sequence[str], pattern: str) -> list[pathlib.Path]:
    """Expands files and directories (recursively, by `pattern`) into a sorted file list."""
    files = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            files.extend(p for p in path.rglob(pattern) if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input {item} is neither a file nor a directory")
    return sorted(set(files))


def prepare(
    output_dir: str | pathlib.Path,
    *,
    files: Sequence[pathlib.Path] | None = None,
    tokenizer: str = "byte",
    val_permille: int = 50,
    num_shards: int = 4,
    source: str | None = None,
) -> dict:
    """Tokenizes `files` (default: the embedded stdlib corpus) into `output_dir`; returns the metadata."""
    from array_record.python import array_record_module  # noqa: PLC0415  (heavy import)

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if files is None:
        files = corpus_lib.stdlib_python_files()
        source = source or f"python stdlib .py files at {corpus_lib.stdlib_root()}"
    if not files:
        raise ValueError("no input files to prepare")
    tok = tokenizers.make_tokenizer(tokenizer)
    dtype = record_dtype(tok.vocab_size)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    docs = {split: [] for split in corpus_lib.SPLITS}
    for _, content in corpus_lib.iter_documents(files):
        ids = tok.encode(content)
        if ids.size == 0:
            continue
        if ids.min() < 0 or ids.max() >= tok.vocab_size:
            raise ValueError(f"tokenizer produced ids outside [0, {tok.vocab_size})")
        docs[corpus_lib.split_of(content, val_permille)].append(ids.astype(dtype))

    meta = {
        "format": "prism-jax-tokens-v1",
        "source": source or "files",
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.str,
        "val_permille": val_permille,
        "splits": {},
    }
    for split, split_docs in docs.items():
        shards = min(num_shards, max(1, len(split_docs)))
        names = [f"{split}-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
        for i, name in enumerate(names):
            tmp = output_dir / (name + ".tmp")
            writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
            for ids in split_docs[i::shards]:
                writer.write(ids.tobytes())
            writer.close()
            tmp.replace(output_dir / name)
        meta["splits"][split] = {
            "documents": len(split_docs),
            "tokens": int(sum(d.size for d in split_docs)),
            "shards": names,
        }
    # Written last: a directory with meta.json is complete.
    tmp_meta = output_dir / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    tmp_meta.replace(output_dir / META_FILE)
    return meta


def load_meta(data_dir: str | pathlib.Path) -> dict:
    """Reads and checks `meta.json` of a prepared directory; clear errors when it is missing or empty."""
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data_dir {data_dir} does not exist (run `python -m train.data.prepare`)")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"data_dir {data_dir} has no {META_FILE}: it is empty or not prepared "
            "(run `python -m train.data.prepare --output_dir DIR`)"
        )
    meta = json.loads(meta_path.read_text())
    for split in corpus_lib.SPLITS:
        info = meta.get("splits", {}).get(split)
        if not info or info["tokens"] == 0:
            raise ValueError(f"data_dir {data_dir} has no {split} tokens")
        for shard in info["shards"]:
            if not (data_dir / shard).is_file():
                raise ValueError(f"data_dir {data_dir} is missing shard {shard}")
    return meta


def _define_flags():
    """The CLI's flags, defined only when the module runs as a program (importers get none)."""
    return dict(
        output_dir=flags.DEFINE_string("output_dir", None, "Directory for the shards and meta.json.",
                                       required=True),
        input=flags.DEFINE_multi_string("input", [], "Files or directories; default: the embedded stdlib corpus."),
        pattern=flags.DEFINE_string("pattern", "*.txt", "Glob for files inside --input directories."),
        tokenizer=flags.DEFINE_string("tokenizer", "byte", "'byte' or a SentencePiece .model file."),
        val_permille=flags.DEFINE_integer("val_permille", 50, "Documents per 1000 that go to validation."),
        num_shards=flags.DEFINE_integer("num_shards", 4, "ArrayRecord shards per split."),
    )


def main(argv, f):
    del argv
    files = collect_input_files(f["input"].value, f["pattern"].value) if f["input"].value else None
    meta = prepare(
        f["output_dir"].value,
        files=files,
        tokenizer=f["tokenizer"].value,
        val_permille=f["val_permille"].value,
        num_shards=f["num_shards"].value,
    )
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']} tokens, {len(info['shards'])} shards")


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
