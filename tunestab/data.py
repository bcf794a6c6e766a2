"""Data layer for small GPT pre-training trials.

Three jobs, kept deliberately small and explicit (nanoGPT style):

1. Tokenizers (`get_tokenizer`): tiktoken encodings, including an offline byte-level
   one ("bytes") so that a trial never needs network access just to tokenise.
2. Token streams (`load_splits`): read documents from a source (the embedded "builtin"
   corpus, a Hugging Face hub dataset, or local files), tokenise them, split them into
   train/val *by document*, and cache the result on disk so that the many trials of one
   search tokenise once.
3. Batches (`Batches`, `eval_batches`): deterministic, resumable batches of packed
   blocks, sliced per DDP rank such that the global batch does not depend on the
   number of workers.

Every problem a user can fix (missing file, no network, bad batch size, ...) raises
`DataError` with a message that says what went wrong and where.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tiktoken and torch are imported lazily below; only annotations need them here
    import tiktoken
    import torch

    from .config import TrialConfig

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"

# Bump whenever what ends up in a cache file changes (corpus selection, split rule,
# file layout, ...): old cache files then simply stop matching and are rebuilt.
CACHE_FORMAT_VERSION = 1

# The "builtin" corpus stops after about this many characters of text. 6 MB tokenises
# in well under a second with the "bytes" tokenizer and is plenty for small trials.
BUILTIN_MAX_CHARS = 6_000_000

# Documents are tokenised in groups so tiktoken can use its thread pool.
_ENCODE_GROUP = 256

# Local file extensions we understand, and the `datasets` builder that reads each.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data/tokenizer problem a user can fix; message says what and where."""


# ----------------------------------------------------------------------------------
# tokenizers


# GPT-2's pre-tokenisation regex. With byte-level ranks and no merges it does not
# change the result (every byte is its own token either way); it only decides how
# tiktoken chunks the text internally.
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> "tiktoken.Encoding":
    """The tiktoken encoding called `name`; "bytes" is a built-in offline byte tokenizer.

    "bytes" maps every byte to its own id (0..255) and EOT to 256, so n_vocab == 257.
    It is built in-process, so it works on machines that cannot download BPE files.
    Any other name goes to `tiktoken.get_encoding`, which downloads its BPE file on
    first use and caches it; without network that fails, and we say how to fix it.
    """
    import tiktoken

    if name == "bytes":
        return tiktoken.Encoding(
            name="bytes",
            pat_str=_GPT2_PAT,
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={EOT: 256},
        )

    known = tiktoken.list_encoding_names()
    if name not in known:
        raise DataError(
            f"unknown tokenizer {name!r}: use 'bytes' (offline, byte-level) or one of "
            f"the tiktoken encodings {sorted(known)}"
        )
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # requests/OS errors from the download, hash mismatches, ...
        raise DataError(
            f"tokenizer {name!r}: tiktoken could not load the encoding files for {name!r} "
            f"({type(e).__name__}: {e}). tiktoken downloads them once and then reads them "
            f"from its cache directory, which is $TIKTOKEN_CACHE_DIR (else "
            f"$DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache; here: {_tiktoken_cache_dir()}). "
            f"On a machine with network run `TIKTOKEN_CACHE_DIR=/some/dir python -c "
            f"\"import tiktoken; tiktoken.get_encoding('{name}')\"`, copy /some/dir to this "
            f"machine and set TIKTOKEN_CACHE_DIR to it; or use tokenizer='bytes', which "
            f"needs no download."
        ) from e
    if EOT not in enc.special_tokens_set:
        raise DataError(f"tokenizer {name!r} has no {EOT} token, which documents are separated by")
    return enc


def _tiktoken_cache_dir() -> str:
    """Where tiktoken looks for its cached files (mirrors tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or "(caching disabled: empty value)"
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _token_dtype(n_vocab: int) -> np.dtype:
    # uint16 halves memory and cache size for every vocabulary GPT-2 sized or smaller.
    return np.dtype(np.uint16 if n_vocab < 2**16 else np.uint32)


# ----------------------------------------------------------------------------------
# document sources: each yields the documents (strings) of a source, in a fixed order


def _builtin_documents() -> Iterator[str]:
    """An offline English + code corpus from files that every CPython installation has.

    First the English documentation topics of pydoc (`help('if')` etc., one document
    per topic), then standard-library Python source files (one document per file),
    until about BUILTIN_MAX_CHARS characters.
    """
    from pydoc_data.topics import topics

    n_chars = 0
    for key in sorted(topics):
        yield topics[key]
        n_chars += len(topics[key])
    for path in _stdlib_sources():
        if n_chars >= BUILTIN_MAX_CHARS:
            return
        # A few stdlib files are deliberately not UTF-8 (encoding tests); replacing the
        # odd byte is better than losing the file or failing the whole corpus.
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        n_chars += len(text)


def _stdlib_sources() -> Iterator[Path]:
    """Standard-library .py files: top-level modules first, then packages, sorted.

    Skipped: third-party packages (site-packages), test suites (some distributions strip
    them, so the corpus would depend on the distro), the machine-generated sysconfig data,
    and pydoc_data, whose text is already in the corpus as the topics documents (keeping it
    would leak val documents into train).
    """
    skip_dirs = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "pydoc_data"}
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)  # walk order = sorted
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                yield Path(dirpath) / name


def _hub_documents(path: str, config: str | None, hf_cache: str) -> Iterator[str]:
    """The `text` column of a Hugging Face hub dataset, streamed (nothing is downloaded in full)."""
    where = f"Hugging Face dataset {path!r}" + (f" (config {config!r})" if config else "")
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split="train", streaming=True, cache_dir=hf_cache)
        for row in ds:  # network errors can also surface here, mid-stream
            if "text" not in row:
                raise DataError(f"{where} has no 'text' column (columns: {sorted(row)})")
            yield row["text"]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataError(
            f"could not load {where} from the hub ({type(e).__name__}: {e}). Streaming needs "
            f"network access to huggingface.co. Without network: run this once on a machine "
            f"with network using the same cache_dir (the tokenised result is cached there and "
            f"then reused offline; set HF_HOME / HF_DATASETS_CACHE if the hub's own caches must "
            f"live elsewhere), or download the dataset's files and pass their local path "
            f"(.txt, .jsonl/.json or .parquet) as the source."
        ) from e


def _resolve_local_files(source: str) -> list[Path]:
    """The data files a local source names: one file, a directory (recursive) or a glob."""
    pattern = os.path.expanduser(source)
    if glob.has_magic(pattern):
        candidates = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        candidates = [p for p in candidates if p.is_file()]
        what = f"glob {source!r}"
    elif os.path.isdir(pattern):
        candidates = sorted(p for p in Path(pattern).rglob("*") if p.is_file())
        what = f"directory {source!r}"
    elif os.path.isfile(pattern):
        path = Path(pattern)
        if path.suffix.lower() not in _BUILDERS:
            raise DataError(
                f"data file {source!r}: unsupported extension {path.suffix!r} (supported: {', '.join(_BUILDERS)})"
            )
        return [path]
    else:
        raise DataError(
            f"data source {source!r}: no such file or directory (expected 'builtin', "
            f"'hf:<dataset>[:<config>]', or a local file, directory or glob of "
            f"{', '.join(_BUILDERS)} files)"
        )
    # Directories and globs may hold other files (README, checksums): use only data files.
    files = [p for p in candidates if p.suffix.lower() in _BUILDERS]
    if not files:
        raise DataError(f"{what}: no {', '.join(_BUILDERS)} files found (found {len(candidates)} other files)")
    return files


def _local_documents(files: list[Path], hf_cache: str) -> Iterator[str]:
    """Documents from local files, loaded through `datasets`' packaged builders.

    .txt files are read whole (sample_by="document": one file = one document, so EOT
    marks real document boundaries); .jsonl/.json and .parquet give one document per
    record, from the `text` field.
    """
    import datasets

    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(_BUILDERS[f.suffix.lower()], []).append(str(f))
    for builder in sorted(by_builder):
        group = by_builder[builder]
        where = f"{builder} files {group[:3]}" + (f" and {len(group) - 3} more" if len(group) > 3 else "")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=hf_cache, **kwargs)
        except Exception as e:  # malformed JSON, unreadable parquet, mixed schemas, ...
            raise DataError(f"could not read {where}: {type(e).__name__}: {e}") from e
        if "text" not in ds.column_names:
            raise DataError(f"{where} have no 'text' field (fields: {ds.column_names})")
        for batch in ds.select_columns(["text"]).iter(batch_size=1024):
            yield from batch["text"]


def _parse_hub_source(source: str) -> tuple[str, str | None]:
    """'hf:<path>[:<config>]' -> (path, config)."""
    path, _, config = source[len("hf:") :].partition(":")
    if not path:
        raise DataError(f"data source {source!r}: expected 'hf:<dataset>[:<config>]'")
    return path, (config or None)


# ----------------------------------------------------------------------------------
# tokenise + split


def _is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to val: a stable hash of its text mapped to [0, 1).

    crc32 (unlike Python's hash()) is the same in every process and on every machine,
    so all trials agree on the split, and the same document always lands on the same
    side however the corpus is ordered or truncated.
    """
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) / 2**32 < val_fraction


def _tokenize_split(
    docs: Iterable[str], enc: "tiktoken.Encoding", val_fraction: float, max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise documents (each followed by EOT) into train/val streams, up to max_tokens in total."""
    dtype = _token_dtype(enc.n_vocab)
    eot = enc.eot_token
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}  # is_val -> per-document arrays
    total = 0

    def groups() -> Iterator[list[str]]:
        group: list[str] = []
        for text in docs:
            if text is None or text == "":
                continue  # empty records (blank lines, null fields) are not documents
            if not isinstance(text, str):
                raise DataError(f"document text must be a string, got {type(text).__name__}: {text!r:.80}")
            group.append(text)
            if len(group) == _ENCODE_GROUP:
                yield group
                group = []
        if group:
            yield group

    for group in groups():
        # encode_ordinary: a literal "<|endoftext|>" inside a document is just text, so
        # document boundaries are exactly the EOTs we append.
        for text, ids in zip(group, enc.encode_ordinary_batch(group)):
            ids.append(eot)
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            parts[_is_val(text, val_fraction)].append(np.asarray(ids, dtype=dtype))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break  # also closes the source generator: a hub stream stops here

    if total == 0:
        raise DataError("the data source contains no documents")
    train, val = (np.concatenate(parts[k]) if parts[k] else np.empty(0, dtype) for k in (False, True))
    if len(train) == 0 or len(val) == 0:
        # Too few documents for a split by document (e.g. a single .txt file). Holding out
        # the tail of the stream is still deterministic, and far better than an empty split.
        warnings.warn(
            f"only {sum(map(len, parts.values()))} documents: the split by document left "
            f"{'train' if len(train) == 0 else 'val'} empty, so val is the last "
            f"{val_fraction:.1%} of the token stream instead",
            stacklevel=3,
        )
        stream = np.concatenate([train, val]) if len(val) else train
        n_val = max(1, int(round(len(stream) * val_fraction)))
        train, val = stream[:-n_val], stream[-n_val:]
    return train, val


# ----------------------------------------------------------------------------------
# on-disk cache


def _cache_path(cache_dir: str, key: dict) -> Path:
    """The cache file for a key: a readable slug of the source plus a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key["source"]))[-40:].strip("_.") or "data"
    return Path(cache_dir) / f"tokens-{slug}-{key['tokenizer']}-{digest}.npz"


def _save_cache(path: Path, train: np.ndarray, val: np.ndarray, key: dict) -> None:
    """Write atomically: a temp file in the same directory, then os.replace.

    Concurrent trials on one machine may all miss the cache and build it at once; each
    writes its own temp file and os.replace swaps it in atomically, so a reader sees
    either no file or a complete one, never a half-written one. (Their contents are
    identical, so it does not matter whose replace wins.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train=train, val=val, key=np.array(json.dumps(key, sort_keys=True)))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other users' trials may share the cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["train"], f["val"]
    except Exception as e:  # e.g. a file damaged by hand or by a full disk: rebuild it
        log.warning("ignoring unreadable token cache %s (%s); rebuilding it", path, e)
        return None


# ----------------------------------------------------------------------------------
# load_splits


def cache_dir(cfg: "TrialConfig") -> str:
    """Where a trial's tokenised corpus is cached: `data_cache`, else ~/.cache/tunestab."""
    return cfg.data_cache or os.path.join(os.path.expanduser("~"), ".cache", "tunestab")


def load_splits(
    source: str, tokenizer: str, cache_dir: str, val_fraction: float = 0.05, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised (train, val) token streams as 1-D integer numpy arrays (uint16 when n_vocab < 65536 else uint32).

    Documents are tokenised, each followed by the EOT token id, and concatenated.
    The split is by document and deterministic: a document goes to val when a stable
    hash of its text (zlib.crc32) maps below val_fraction. max_tokens caps the total
    (train + val) number of tokens read, in source order.

    source: "builtin" (offline English + Python corpus from the CPython installation),
    "hf:<path>[:<config>]" (a hub dataset, streamed; max_tokens required), or a local
    file, directory or glob of .txt / .jsonl / .json / .parquet files (field "text").

    The result is cached under cache_dir, keyed by everything it depends on; a second
    call loads the cache without reading or tokenising the source.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise DataError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
    hf_cache = os.path.join(cache_dir, "hf")  # keep datasets' own cache inside ours

    # Pick the source and what identifies its content (beyond its name) for the cache key.
    if source == "builtin":
        # The corpus is read from this Python installation: key on which one it is.
        fingerprint = [
            platform.python_implementation(),
            platform.python_version(),
            sysconfig.get_paths()["stdlib"],
            BUILTIN_MAX_CHARS,
        ]
        docs = _builtin_documents
    elif source.startswith("hf:"):
        hub_path, config = _parse_hub_source(source)
        if max_tokens is None:
            raise DataError(
                f"data source {source!r}: max_tokens is required for hub datasets "
                f"(they are streamed, and can be far larger than a trial needs)"
            )
        fingerprint = None  # the hub offers no cheap content fingerprint; the name is the key
        docs = functools.partial(_hub_documents, hub_path, config, hf_cache)
    else:
        files = _resolve_local_files(source)
        # size + mtime catch edits to the files without hashing gigabytes on every call.
        fingerprint = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        docs = functools.partial(_local_documents, files, hf_cache)

    key = {
        "version": CACHE_FORMAT_VERSION,
        "source": source,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "fingerprint": fingerprint,
    }
    cache_file = _cache_path(cache_dir, key)
    cached = _load_cache(cache_file)
    if cached is not None:
        log.info("loaded tokens for %r from cache %s", source, cache_file)
        return cached

    enc = get_tokenizer(tokenizer)
    train, val = _tokenize_split(docs(), enc, val_fraction, max_tokens)
    _save_cache(cache_file, train, val, key)
    log.info(
        "tokenised %r with %r: %d train + %d val tokens -> %s", source, tokenizer, len(train), len(val), cache_file
    )
    return train, val


# ----------------------------------------------------------------------------------
# batches


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of the best model that ignores
    context, which predicts every token from how common it is."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """View tokens as non-overlapping [n_blocks, seq_len + 1] blocks (the remainder is dropped)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n_blocks = len(tokens) // (seq_len + 1)
    return tokens[: n_blocks * (seq_len + 1)].reshape(n_blocks, seq_len + 1)


def _check_ranks(batch_size: int, rank: int, world_size: int) -> int:
    """Validate the DDP layout; returns the per-rank batch size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise DataError(
            f"batch_size (global) = {batch_size} must be a positive multiple of "
            f"world_size = {world_size}, so every rank gets the same share"
        )
    return batch_size // world_size


def _to_xy(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: checking a search's data must not load torch

    # Inputs are every token but the last, targets every token but the first. int64
    # because that is what embedding lookups and cross_entropy want.
    x = torch.from_numpy(blocks[:, :-1].astype(np.int64))
    y = torch.from_numpy(blocks[:, 1:].astype(np.int64))
    return x, y


class Batches:
    """Deterministic, resumable batches of packed blocks for one DDP rank.

    tokens is chopped into non-overlapping blocks of seq_len+1 tokens (x = block[:-1], y = block[1:]).
    Every epoch the block order is a permutation seeded by (seed, epoch). Step t of the *global* batch uses
    blocks perm[t*batch_size:(t+1)*batch_size]; rank r takes the contiguous slice of batch_size // world_size of those.
    So ranks read disjoint blocks, and 1 worker and 2 workers see the same global batch at each step.
    Blocks left over after the last full global batch of an epoch are skipped in that epoch (a
    different permutation next epoch skips different ones).
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.local_batch_size = _check_ranks(batch_size, rank, world_size)
        self.blocks = _blocks(tokens, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(self.blocks) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(tokens)} tokens make only {len(self.blocks)} blocks of seq_len+1 = "
                f"{seq_len + 1} tokens, fewer than one global batch of {batch_size}: use more "
                f"data, a smaller batch_size or a shorter seq_len"
            )
        self.epoch, self.position = 0, 0  # position = index of the next step within the epoch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        # Seeded by (seed, epoch) alone, so any rank, or a resumed run, can rebuild it.
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.blocks)), self.epoch
        return self._perm

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank: int64 tensors of shape [batch_size // world_size, seq_len]."""
        start = self.position * self.batch_size + self.rank * self.local_batch_size
        idx = self._permutation()[start : start + self.local_batch_size]
        # Advance eagerly, so state_dict() never points past the end of an epoch.
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return _to_xy(self.blocks[idx])

    def state_dict(self) -> dict:
        # Plain ints only, so checkpoints load with torch.load(weights_only=True).
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise DataError(
                f"batch state {state} does not fit this data ({self.steps_per_epoch} steps per "
                f"epoch): was the checkpoint made with different data, batch_size or seq_len?"
            )
        self.epoch, self.position = epoch, position


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the first n_batches global batches of blocks in order (capped at what exists, at least one),
    each rank takes its slice. Same for every call (so val losses are comparable across steps and trials)."""
    local = _check_ranks(batch_size, rank, world_size)
    blocks = _blocks(tokens, seq_len)
    available = len(blocks) // batch_size
    if available == 0:
        raise DataError(
            f"validation data too small: {len(tokens)} tokens make {len(blocks)} blocks of "
            f"{seq_len + 1} tokens, fewer than one global batch of {batch_size}: raise "
            f"val_fraction or lower batch_size / seq_len"
        )
    batches = []
    for i in range(max(1, min(n_batches, available))):
        start = i * batch_size + rank * local
        batches.append(_to_xy(blocks[start : start + local]))
    return batches
