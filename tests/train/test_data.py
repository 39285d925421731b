"""Data level: corpus split, tokenizers, prepare, packing with segment ids, resumable iterators."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from train.data import corpus, pipeline, tokenizers
from train.data import prepare as prepare_lib

from conftest import write_documents


def _records(data_dir, meta, split):
    from array_record.python import array_record_module

    docs = []
    dtype = np.dtype(meta["dtype"])
    for shard in meta["splits"][split]["shards"]:
        reader = array_record_module.ArrayRecordReader(str(data_dir / shard))
        docs += [np.frombuffer(r, dtype).astype(np.int32) for r in reader.read_all()]
        reader.close()
    return docs


def _spec(data_dir, split="val", **kw):
    defaults = dict(seq_len=16, batch_size=3, shuffle=False, repeat=False, vocab_size=256)
    defaults.update(kw)
    return pipeline.PipelineSpec(data_dir=str(data_dir), split=split, **defaults)


def test_stdlib_corpus_is_found_and_split_by_content():
    files = corpus.stdlib_python_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" and f.stat().st_size > 0 for f in files)
    assert not any("site-packages" in f.parts for f in files)
    splits = collections.Counter(corpus.split_of(f.read_bytes(), 50) for f in files[:300])
    assert splits["val"] > 0 and splits["train"] > splits["val"]
    assert corpus.split_of(b"same text", 500) == corpus.split_of(b"same text", 500)


def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    ids = tok.encode(text.encode())
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="byte tokenizer ids"):
        tok.decode([300])


def test_sentencepiece_tokenizer_prepares_and_counts_bytes(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    files = write_documents(tmp_path / "text", 40, max_len=400)
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_prefix=str(tmp_path / "sp"), vocab_size=60,
        model_type="unigram", character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    tok = tokenizers.make_tokenizer(str(tmp_path / "sp.model"))
    text = files[0].read_text().splitlines()[1]  # one line: sentencepiece has no newline piece
    assert tok.decode(tok.encode(text)) == text
    lengths = tok.token_byte_lengths()
    ids = tok.encode(text)
    assert 0 < lengths[ids].sum() <= len(text.encode()) + 1  # +1: the leading word-boundary marker
    meta = prepare_lib.prepare(tmp_path / "prep", files=files, tokenizer=str(tmp_path / "sp.model"))
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["vocab_size"] == 60
    assert isinstance(tokenizers.tokenizer_from_spec(meta["tokenizer"]), tokenizers.SentencePieceTokenizer)


def test_prepare_keeps_every_document_on_one_side_of_the_split(small_corpus):
    data_dir, files, meta = small_corpus
    train_docs = _records(data_dir, meta, "train")
    val_docs = _records(data_dir, meta, "val")
    assert len(train_docs) + len(val_docs) == len(files)
    assert len(val_docs) > 5 and len(train_docs) > 5
    for split, docs in (("train", train_docs), ("val", val_docs)):
        for ids in docs:
            assert corpus.split_of(ids.astype(np.uint8).tobytes(), 300) == split
    assert not {d.tobytes() for d in train_docs} & {d.tobytes() for d in val_docs}
    assert meta["splits"]["val"]["tokens"] == sum(d.size for d in val_docs)


def test_packing_drops_no_tokens_and_marks_documents(small_corpus):
    data_dir, _, meta = small_corpus
    docs = _records(data_dir, meta, "val")
    texts = [d.astype(np.uint8).tobytes() for d in docs]
    batches = list(pipeline.make_dataset(_spec(data_dir)))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in ("tokens", "segment_ids", "positions")}
    real = rows["segment_ids"] > 0
    assert real.sum() == sum(d.size for d in docs)  # no token dropped, none invented
    assert collections.Counter(rows["tokens"][real].tolist()) == collections.Counter(np.concatenate(docs).tolist())
    for tokens, seg, pos in zip(rows["tokens"], rows["segment_ids"], rows["positions"]):
        n = int((seg > 0).sum())
        assert (seg[n:] == 0).all() and (seg[:n] > 0).all()  # padding only at the end
        assert (np.diff(seg[:n]) >= 0).all() and seg[0] == 1
        for s in np.unique(seg[:n]):
            where = np.flatnonzero(seg == s)
            assert (pos[where] == np.arange(where.size)).all()  # positions restart per segment
            piece = tokens[where].astype(np.uint8).tobytes()
            assert any(piece in t for t in texts)  # a segment never spans two documents
    assert (rows["segment_ids"].max(axis=1) > 1).any()  # some rows really hold several documents


def test_documents_boundaries_off_gives_one_segment(small_corpus):
    data_dir, _, _ = small_corpus
    batch = next(iter(pipeline.make_dataset(_spec(data_dir, document_boundaries=False))))
    assert set(np.unique(batch["segment_ids"])) <= {0, 1}
    assert (batch["positions"] == np.arange(16)).all()


def test_restored_iterator_yields_the_next_batch(small_corpus):
    data_dir, _, _ = small_corpus
    spec = _spec(data_dir, "train", shuffle=True, repeat=True, seed=3)
    it = iter(pipeline.make_dataset(spec))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = iter(pipeline.make_dataset(spec))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_shuffle_depends_on_seed(small_corpus):
    data_dir, _, _ = small_corpus
    first = {s: next(iter(pipeline.make_dataset(_spec(data_dir, "train", shuffle=True, repeat=True, seed=s))))
             for s in (0, 1)}
    assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])


def test_hosts_read_disjoint_documents(small_corpus):
    data_dir, _, meta = small_corpus
    seen = []
    for index in range(2):
        spec = _spec(data_dir, process_index=index, process_count=2, seq_len=8, batch_size=1)
        rows = list(pipeline.make_dataset(spec))
        seen.append(sum(int((b["segment_ids"] > 0).sum()) for b in rows))
    assert sum(seen) == meta["splits"]["val"]["tokens"] and all(s > 0 for s in seen)


def test_eval_batches_pads_to_a_fixed_count(small_corpus):
    data_dir, _, _ = small_corpus
    batches = list(pipeline.eval_batches(_spec(data_dir, seq_len=64, batch_size=4), 50))
    assert len(batches) == 50 and all(b["tokens"].shape == (4, 64) for b in batches)
    assert (batches[-1]["segment_ids"] == 0).all()


def test_bad_data_inputs_fail_clearly(small_corpus, tmp_path):
    data_dir, _, _ = small_corpus
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.make_dataset(_spec(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty or not prepared"):
        pipeline.make_dataset(_spec(tmp_path / "empty"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pipeline.make_dataset(_spec(data_dir, vocab_size=100))
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.make_dataset(_spec(data_dir, seq_len=1))
    with pytest.raises(ValueError, match="split"):
        pipeline.make_dataset(_spec(data_dir, split="test"))


def test_out_of_vocabulary_ids_in_records_are_caught(tmp_path):
    from array_record.python import array_record_module

    data_dir = tmp_path / "bad"
    prepare_lib.prepare(data_dir, files=write_documents(tmp_path / "t", 6), val_permille=500, num_shards=1)
    meta = json.loads((data_dir / "meta.json").read_text())
    writer = array_record_module.ArrayRecordWriter(str(data_dir / meta["splits"]["train"]["shards"][0]), "group_size:1")
    writer.write(np.array([1, 2, 999], "<u2").tobytes())
    writer.close()
    ds = pipeline.make_dataset(_spec(data_dir, "train"))
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        list(ds)
