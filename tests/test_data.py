"""Tests for tunestab.data: tokenizers, sources, split, cache, and batching."""

import json
import socket
import zlib

import numpy as np
import pytest
import torch

from tunestab import data
from tunestab.data import EOT, Batches, DataError, eval_batches, get_tokenizer, load_splits

# ----------------------------------------------------------------------------------
# helpers / fixtures


def _block_network(mp: pytest.MonkeyPatch) -> None:
    """Make every outgoing connection fail, and tell the HF libraries they are offline.

    datasets reads HF_DATASETS_OFFLINE once at import time, so the already-imported
    config is patched too; otherwise a blocked hub request retries for ~25 s before failing.
    """

    def refuse(*args, **kwargs):
        raise OSError("network disabled by test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def offline(monkeypatch):
    _block_network(monkeypatch)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """The builtin corpus, loaded once (cold) with the network blocked."""
    cache_dir = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        train, val = load_splits("builtin", "bytes", str(cache_dir), val_fraction=0.05)
    return cache_dir, train, val


def _docs(tokens: np.ndarray) -> list[str]:
    """Split a bytes-tokenizer stream back into its documents."""
    enc = get_tokenizer("bytes")
    text = enc.decode(tokens.tolist())
    assert text.endswith(EOT)
    return text.split(EOT)[:-1]


DOCS = [f"document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(60)]


def _fail(*args, **kwargs):
    raise AssertionError("should have been served from the cache")


# ----------------------------------------------------------------------------------
# tokenizer


def test_bytes_tokenizer_roundtrip():
    enc = get_tokenizer("bytes")
    assert enc.n_vocab == 257
    assert enc.eot_token == 256
    assert get_tokenizer("bytes") is enc  # cached
    text = "héllo wörld ✓\n\tdef f(x): return x"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))  # one id per byte
    assert enc.decode(ids) == text
    ids = enc.encode(text + EOT + "next", allowed_special={EOT})
    assert ids.count(256) == 1
    assert enc.decode(ids) == text + EOT + "next"


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="no-such-encoding"):
        get_tokenizer("no-such-encoding")


def test_uncached_gpt2_without_network(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: really uncached
    with pytest.raises(DataError) as e:
        get_tokenizer("gpt2")
    msg = str(e.value)
    assert "gpt2" in msg and "TIKTOKEN_CACHE_DIR" in msg and str(tmp_path) in msg


# ----------------------------------------------------------------------------------
# builtin source + cache


def test_builtin_offline(builtin):
    _, train, val = builtin
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert train.ndim == 1 and val.ndim == 1
    total = len(train) + len(val)
    assert 3_000_000 < total < 8_000_000
    assert 0.02 < len(val) / total < 0.15  # roughly val_fraction, by whole documents
    assert int(train.max()) < 257 and int(val.max()) < 257
    # Many documents, each terminated by EOT, and both streams end on a document boundary.
    assert (train == 256).sum() > 100 and (val == 256).sum() > 5
    assert train[-1] == 256 and val[-1] == 256

    text = get_tokenizer("bytes").decode(np.concatenate([train, val]).tolist())
    assert "statement is used for conditional execution" in text  # pydoc English topics
    assert "\ndef " in text and "\nimport " in text and "self." in text  # Python source


def test_builtin_split_follows_crc32_rule(builtin):
    _, train, val = builtin
    for doc in _docs(train)[:50]:
        assert zlib.crc32(doc.encode()) / 2**32 >= 0.05
    for doc in _docs(val):
        assert zlib.crc32(doc.encode()) / 2**32 < 0.05


def test_builtin_second_call_uses_cache(builtin, monkeypatch):
    cache_dir, train, val = builtin
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind
    # Neither the source nor the tokenizer may be touched on a cache hit.
    monkeypatch.setattr(data, "get_tokenizer", _fail)
    monkeypatch.setattr(data, "_builtin_documents", _fail)
    train2, val2 = load_splits("builtin", "bytes", str(cache_dir), val_fraction=0.05)
    np.testing.assert_array_equal(train2, train)
    np.testing.assert_array_equal(val2, val)
    assert train2.dtype == train.dtype
    # A different key is a different cache entry, so this one must tokenise (and fails).
    with pytest.raises(AssertionError, match="served from the cache"):
        load_splits("builtin", "bytes", str(cache_dir), val_fraction=0.1)


def test_max_tokens_truncates(tmp_path, builtin):
    _, train, val = builtin
    tr, va = load_splits("builtin", "bytes", str(tmp_path), max_tokens=200_000)
    assert len(tr) + len(va) == 200_000
    # Truncation only drops the tail: train is a prefix of the full train stream.
    np.testing.assert_array_equal(tr, train[: len(tr)])


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))

    def crash(f, **arrays):  # write half a file, then die
        f.write(b"PK\x03\x04 half written")
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    with monkeypatch.context() as mp:
        mp.setattr(np, "savez", crash)
        with pytest.raises(KeyboardInterrupt):
            load_splits(str(path), "bytes", str(cache), val_fraction=0.3)
    assert not list(cache.glob("*.npz*"))  # neither a cache file nor a temp file
    train, val = load_splits(str(path), "bytes", str(cache), val_fraction=0.3)
    _check_split(train, val, DOCS, 0.3)
    assert len(list(cache.glob("*.npz*"))) == 1


# ----------------------------------------------------------------------------------
# local files


def _check_split(train, val, docs, val_fraction):
    train_docs, val_docs = _docs(train), _docs(val)
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert train_docs and val_docs
    for d in val_docs:
        assert zlib.crc32(d.encode()) / 2**32 < val_fraction
    for d in train_docs:
        assert zlib.crc32(d.encode()) / 2**32 >= val_fraction


def test_local_txt_one_document_per_file(tmp_path):
    src = tmp_path / "txt"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"{i:03d}.txt").write_text(d + "\n\nsecond paragraph\n")
    (src / "README.md").write_text("not data")  # ignored in a directory source
    train, val = load_splits(str(src), "bytes", str(tmp_path / "c"), val_fraction=0.3)
    _check_split(train, val, [d + "\n\nsecond paragraph\n" for d in DOCS], 0.3)
    # datasets' own cache stays inside cache_dir
    assert (tmp_path / "c" / "hf").is_dir()


def test_local_jsonl_deterministic(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    a = load_splits(str(path), "bytes", str(tmp_path / "c1"), val_fraction=0.3)
    b = load_splits(str(path), "bytes", str(tmp_path / "c2"), val_fraction=0.3)  # fresh cache
    _check_split(*a, DOCS, 0.3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_local_file_change_invalidates_cache(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
    a = load_splits(str(path), "bytes", str(tmp_path / "c"), val_fraction=0.3)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    b = load_splits(str(path), "bytes", str(tmp_path / "c"), val_fraction=0.3)
    _check_split(*b, DOCS, 0.3)
    assert len(b[0]) + len(b[1]) > len(a[0]) + len(a[1])


def test_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    train, val = load_splits(str(tmp_path / "*.parquet"), "bytes", str(tmp_path / "c"), val_fraction=0.3)
    _check_split(train, val, DOCS, 0.3)


def test_single_document_falls_back_to_tail_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single long document " * 100)
    with pytest.warns(UserWarning, match="empty"):
        train, val = load_splits(str(path), "bytes", str(tmp_path / "c"), val_fraction=0.1)
    assert len(val) == round(0.1 * 2301) and len(train) + len(val) == 2301


# ----------------------------------------------------------------------------------
# errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        load_splits(str(missing), "bytes", str(tmp_path / "c"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported extension"):
        load_splits(str(path), "bytes", str(tmp_path / "c"))


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError, match="'text'"):
        load_splits(str(path), "bytes", str(tmp_path / "c"))


def test_hub_without_network(offline, tmp_path):
    with pytest.raises(DataError) as e:
        load_splits("hf:someone/some-dataset:cfg", "bytes", str(tmp_path), max_tokens=1000)
    msg = str(e.value)
    assert "someone/some-dataset" in msg and "network" in msg and "local path" in msg
    assert not list(tmp_path.glob("*.npz"))


def test_hub_requires_max_tokens(tmp_path):
    with pytest.raises(DataError, match="max_tokens"):
        load_splits("hf:someone/some-dataset", "bytes", str(tmp_path))


# ----------------------------------------------------------------------------------
# Batches


TOKENS = (np.arange(10_000) % 257).astype(np.uint16)


def test_batches_shapes_and_shift():
    b = Batches(TOKENS, batch_size=8, seq_len=16, seed=1)
    for _ in range(3):
        x, y = b.next()
        assert x.shape == y.shape == (8, 16)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])


def _block_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    """Which block each row of x came from, for tokens = arange (no wrap-around)."""
    return [int(r[0]) // (seq_len + 1) for r in x]


ARANGE = np.arange(20_000, dtype=np.uint32)


def test_batches_whole_blocks_and_permutation():
    b = Batches(ARANGE, batch_size=10, seq_len=19, seed=3)
    seen = []
    for _ in range(b.steps_per_epoch):
        x, y = b.next()
        for rx, ry in zip(x, y):
            start = int(rx[0])
            assert start % 20 == 0  # starts at a block boundary
            assert torch.equal(rx, torch.arange(start, start + 19))
            assert torch.equal(ry, torch.arange(start + 1, start + 20))
        seen += _block_ids(x, 19)
    assert len(set(seen)) == len(seen) == 1000  # one epoch = every block exactly once
    assert seen != sorted(seen)  # shuffled
    assert b.state_dict() == {"epoch": 1, "position": 0}
    nxt = _block_ids(b.next()[0], 19)
    assert nxt != seen[:10]  # a new permutation in the next epoch


def test_batches_deterministic_per_seed():
    run = lambda seed: _block_ids(Batches(ARANGE, 10, 19, seed=seed).next()[0], 19)  # noqa: E731
    a, b = Batches(ARANGE, 10, 19, seed=7), Batches(ARANGE, 10, 19, seed=7)
    for _ in range(5):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert run(7) != run(8)


def test_batches_ranks_partition_global_batch():
    # 37 blocks, 8 per global batch: 4 steps per epoch, so 10 steps cross two epoch boundaries.
    tokens = np.arange(37 * 17 + 5, dtype=np.uint32)
    one = Batches(tokens, batch_size=8, seq_len=16, seed=5)
    ranks = [Batches(tokens, batch_size=8, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        x, y = one.next()
        (x0, y0), (x1, y1) = ranks[0].next(), ranks[1].next()
        assert x0.shape == (4, 16)
        assert not set(_block_ids(x0, 16)) & set(_block_ids(x1, 16))
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_batches_resume(tmp_path):
    tokens = np.arange(37 * 17, dtype=np.uint32)
    ref = Batches(tokens, batch_size=8, seq_len=16, seed=2)
    expected = [ref.next()[0] for _ in range(12)]  # 4 steps/epoch: crosses epoch boundaries

    b = Batches(tokens, batch_size=8, seq_len=16, seed=2)
    for _ in range(3):
        b.next()
    torch.save(b.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed = Batches(tokens, batch_size=8, seq_len=16, seed=2)
    resumed.load_state_dict(state)
    for t in range(3, 12):
        assert torch.equal(resumed.next()[0], expected[t]), t


def test_batches_bad_config():
    with pytest.raises(DataError, match="multiple of"):
        Batches(ARANGE, batch_size=10, seq_len=19, world_size=3)
    with pytest.raises(DataError, match="fewer than one global batch"):
        Batches(np.arange(100), batch_size=8, seq_len=16)
    b = Batches(ARANGE, batch_size=10, seq_len=19)
    with pytest.raises(DataError):
        b.load_state_dict({"epoch": 0, "position": b.steps_per_epoch})


# ----------------------------------------------------------------------------------
# eval_batches


def test_eval_batches_fixed_and_partitioned():
    a = eval_batches(ARANGE, batch_size=8, seq_len=19, n_batches=3)
    b = eval_batches(ARANGE, batch_size=8, seq_len=19, n_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # In order: the first 24 blocks.
    assert [i for x, _ in a for i in _block_ids(x, 19)] == list(range(24))
    r0 = eval_batches(ARANGE, 8, 19, 3, rank=0, world_size=2)
    r1 = eval_batches(ARANGE, 8, 19, 3, rank=1, world_size=2)
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1):
        assert x0.shape == (4, 19)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_eval_batches_capped():
    tokens = np.arange(20 * 25, dtype=np.uint32)  # 25 blocks -> 3 full batches of 8
    assert len(eval_batches(tokens, 8, 19, n_batches=100)) == 3
    assert len(eval_batches(tokens, 8, 19, n_batches=0)) == 1
    with pytest.raises(DataError):
        eval_batches(tokens[:100], 8, 19, n_batches=1)
