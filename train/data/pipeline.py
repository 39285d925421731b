"""The grain input pipeline: ArrayRecord documents -> shuffled, packed, batched rows.

Each batch is a dict of int32 numpy arrays of shape [batch_per_host, seq_len]:
  tokens       token ids (0 where padded)
  segment_ids  1, 2, ... per document inside the row; 0 marks padding
  positions    position of each token inside its document (restarting at 0 on every new segment)

Rows are packed with grain's concat-then-split: documents are concatenated and cut into rows of
`seq_len`, so no token is dropped; a document cut at a row end continues as a new segment of a
later row. With `document_boundaries=False` the rows are plain slices of the concatenated stream
(segment id 1 everywhere but padding, positions 0..T-1): the model then carries its state across
documents, which is what most linear-attention codebases do.

Documents (not rows) are split across hosts (`process_index::process_count`), so each host reads
only its share; the iterator state (a small JSON-able dict) is what checkpoints save.
"""

from __future__ import annotations

import dataclasses
import pathlib

import grain
import numpy as np

from train.data import prepare as prepare_lib


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides which rows a host sees, in which order."""

    data_dir: str
    split: str
    seq_len: int
    batch_size: int  # rows per host per batch
    seed: int = 0
    shuffle: bool = True
    repeat: bool = True
    document_boundaries: bool = True
    process_index: int = 0
    process_count: int = 1
    vocab_size: int | None = None  # model vocabulary; ids at or above it are an error


class _DecodeTokens(grain.transforms.Map):
    """Record bytes -> {'tokens': int32 [n]}, checking the ids against the model's vocabulary."""

    def __init__(self, dtype: str, vocab_size: int | None):
        self._dtype = np.dtype(dtype)
        self._vocab_size = vocab_size

    def map(self, record: bytes):
        ids = np.frombuffer(record, dtype=self._dtype).astype(np.int32)
        if self._vocab_size is not None and ids.size and (ids.max() >= self._vocab_size or ids.min() < 0):
            raise ValueError(
                f"token id {int(ids.max())} is outside the model vocabulary [0, {self._vocab_size}): "
                "the data was prepared with a larger tokenizer than config.model.vocab_size"
            )
        return {"tokens": ids}


def _rename_packed(row):
    return {
        "tokens": row["tokens"].astype(np.int32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
    }


def _as_stream(row):
    """Drops document boundaries: one segment per row (padding stays segment 0)."""
    seq_len = row["tokens"].shape[0]
    return {
        "tokens": row["tokens"],
        "segment_ids": (row["segment_ids"] > 0).astype(np.int32),
        "positions": np.arange(seq_len, dtype=np.int32),
    }


def validate_spec(spec: PipelineSpec) -> dict:
    """Checks the spec and the data directory; returns the directory's metadata."""
    if spec.split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {spec.split!r}")
    if spec.seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one input and one target), got {spec.seq_len}")
    if spec.batch_size < 1:
        raise ValueError(f"batch_size (rows per host) must be >= 1, got {spec.batch_size}")
    if not 0 <= spec.process_index < spec.process_count:
        raise ValueError(f"process_index {spec.process_index} not in [0, {spec.process_count})")
    meta = prepare_lib.load_meta(spec.data_dir)
    if spec.vocab_size is not None and meta["vocab_size"] > spec.vocab_size:
        raise ValueError(
            f"data in {spec.data_dir} uses a tokenizer of {meta['vocab_size']} ids but the model "
            f"vocabulary (config.model.vocab_size) is {spec.vocab_size}: tokens outside the vocabulary"
        )
    if len(meta["splits"][spec.split]["shards"]) and meta["splits"][spec.split]["documents"] < spec.process_count:
        raise ValueError(
            f"the {spec.split} split has {meta['splits'][spec.split]['documents']} documents, "
            f"fewer than the {spec.process_count} hosts that read it"
        )
    return meta


def make_dataset(spec: PipelineSpec) -> grain.IterDataset:
    """The grain IterDataset of batches described by `spec`."""
    meta = validate_spec(spec)
    data_dir = pathlib.Path(spec.data_dir)
    paths = [str(data_dir / name) for name in meta["splits"][spec.split]["shards"]]
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    ds = ds[spec.process_index :: spec.process_count]
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    if spec.repeat:
        ds = ds.repeat(None)
    ds = ds.map(_DecodeTokens(meta["dtype"], spec.vocab_size))
    it = ds.to_iter_dataset()
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": spec.seq_len})
    it = it.map(_rename_packed)
    if not spec.document_boundaries:
        it = it.map(_as_stream)
    return it.batch(spec.batch_size, drop_remainder=spec.repeat)


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding batch (segment id 0 everywhere): contributes nothing to a loss."""
    zeros = np.zeros((batch_size, seq_len), np.int32)
    return {"tokens": zeros, "segment_ids": zeros.copy(), "positions": zeros.copy()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch with padding rows up to `batch_size`."""
    n = batch["tokens"].shape[0]
    if n == batch_size:
        return batch
    pad = batch_size - n
    return {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in batch.items()}


def eval_batches(spec: PipelineSpec, num_batches: int):
    """Exactly `num_batches` batches of the (unshuffled, single pass) split, padded when it runs out.

    A fixed count keeps every host in step on multi-host runs. `num_batches <= 0` means "the
    whole split", which is only safe on one host.
    """
    if spec.repeat or spec.shuffle:
        raise ValueError("eval_batches wants a spec with shuffle=False and repeat=False")
    it = iter(make_dataset(spec))
    count = 0
    for batch in it:
        if 0 < num_batches <= count:
            return
        yield pad_batch(batch, spec.batch_size)
        count += 1
    while count < num_batches:
        yield empty_batch(spec.batch_size, spec.seq_len)
        count += 1
