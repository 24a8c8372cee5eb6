"""Tokenized corpora as a token source: blended, shuffled and packed into rows.

Each source (one ``PREFIX``, or its train or validation split) is read as an endless stream
of its documents: epoch e lists them in a shuffled order of its own, and epochs follow one
another (a source smaller than its share of the run is re-read in a fresh order; the log
says how many epochs). With L = seq_len, the source's sample a is the tokens
``[a·L, a·L + L + 1)`` of that stream: L tokens and the next one, whole documents and
pieces of them. Sample slots are shuffled in blocks of an epoch's worth of samples, so one
global batch does not hold neighbouring windows of the same documents.

Global sample i comes from the source and slot that ``eurocore.data.blend`` assigns it;
global batch s holds samples ``s·B .. s·B + B - 1``. Everything is a pure function of
(seed, step, index): the same samples reach the same batch positions in every layout.

A row (``pack``): tokens are the window's first L, labels the next L. With document masking
(the default) ``position_ids`` restart at every document start and a document's last token
(its end-of-document token) predicts nothing (-100): no token attends to another document,
no label crosses a boundary. Without, the row is one causal sequence (Megatron's default).

Permutations are cached as ``.npy`` (``IndexCache``), keyed by everything that changes them
(the dataset files' identity: path, size, inode, modification time).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from eurocore.data.blend import blend, parse_data_path, shares
from eurocore.data.indexed import MAP_INDEX_BYTES, IndexedDataset
from eurocore.data.source import Batch, check_same_data
from eurocore.utils.files import write_bytes_atomically, write_json_atomically

CACHE_VERSION = 3
# Epochs (and slot blocks) of one source kept in memory: the current, the next, one more.
KEPT_EPOCHS = 3
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "eurocore", "data-index")


def _rng(*keys: int) -> np.random.RandomState:
    """A generator for ``keys``: the legacy RandomState (its streams never change between
    NumPy versions) seeded through SeedSequence's documented hash."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint32)[0]
    return np.random.RandomState(int(state))


def _permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of range(n) drawn with ``_rng(*keys)``: int32 when n allows (half the
    memory and cache of int64; the same permutation, as shuffle draws the same numbers)."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    _rng(*keys).shuffle(order)
    return order


def dataset_fingerprint(dataset: IndexedDataset) -> dict[str, Any]:
    """What identifies a dataset's files without reading them: their real paths, sizes,
    inodes, and modification and status-change times (the kernel sets ctime on every write,
    and nobody can set it back: a file rewritten in place, even with its old size and
    mtime, gets another fingerprint), and its counts."""
    files = {}
    for kind, path in (("idx", dataset.idx_path), ("bin", dataset.bin_path)):
        stat = path.stat()
        files[kind] = [os.path.realpath(path), stat.st_size, stat.st_ino, stat.st_mtime_ns,
                       stat.st_ctime_ns]
    return {**files, "sequences": dataset.num_sequences, "documents": dataset.num_documents}


class IndexCache:
    """Arrays computed from a dataset, stored as ``.npy`` under ``directory/<key hash>/``.

    The key is everything that changes them (the dataset files' fingerprint, the documents
    used, the seed, seq_len and the cache format); a different key is a different
    directory, so a stale array is never read. Small arrays are read into memory, large
    ones (MAP_INDEX_BYTES and up) mapped. Files are written atomically, by one background
    thread (:meth:`wait` returns when it is done); a cache that cannot be written costs
    recomputation, not the run.
    """

    _writer = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="index-cache")
    _pending: ClassVar[list[concurrent.futures.Future]] = []
    _lock = threading.Lock()

    def __init__(self, directory: str | os.PathLike[str] | None, key: dict[str, Any]) -> None:
        text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)
        self.key = json.loads(text)
        self.dir = (Path(directory) / hashlib.sha256(text.encode()).hexdigest()[:24]
                    if directory is not None else None)
        self.hits = self.misses = 0

    def get(self, name: str, compute) -> np.ndarray:
        """The array ``name``: read from the cache, else ``compute()`` and stored."""
        path = self.dir / f"{name}.npy" if self.dir is not None else None
        if path is not None and path.is_file():
            try:
                large = path.stat().st_size >= MAP_INDEX_BYTES
                array = np.load(path, mmap_mode="r" if large else None)
                self.hits += 1
                return array
            except OSError as err:  # unreadable: recompute, unless out of descriptors
                if err.errno in (errno.EMFILE, errno.ENFILE):
                    raise
            except ValueError:  # not an array (a damaged file): recompute and replace
                pass
        array = compute()
        self.misses += 1
        if path is not None:  # written beside the run, not before it (it is not needed now)
            with IndexCache._lock:
                IndexCache._pending = [f for f in IndexCache._pending if not f.done()]
                IndexCache._pending.append(IndexCache._writer.submit(self._store, path, array))
        return array

    def record(self) -> dict[str, Any]:
        """``record.json`` of this key (facts worth keeping: a verified index, the largest
        token id), {} when absent or unreadable."""
        path = self.dir / "record.json" if self.dir is not None else None
        try:
            return json.loads(path.read_text()) if path is not None and path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def update_record(self, **facts: Any) -> None:
        """Adds ``facts`` to ``record.json`` (written atomically; skipped when the cache
        directory cannot be written)."""
        if self.dir is None:
            return
        record = {**self.record(), **facts, "key": self.key}
        with contextlib.suppress(OSError):
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(record, self.dir / "record.json")

    @staticmethod
    def wait() -> None:
        """Returns when every cache file being written is in place (the next run's start,
        a benchmark's next timing)."""
        with IndexCache._lock:
            pending = list(IndexCache._pending)
        concurrent.futures.wait(pending)

    def _store(self, path: Path, array: np.ndarray) -> None:
        with contextlib.suppress(OSError):  # a read-only cache directory: recompute later
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(path, lambda f: np.save(f, array))


class SourceSamples:
    """The samples of one source: documents ``first_document .. end_document - 1`` of
    ``dataset``, shuffled per epoch with ``seed`` and ``source_id`` (see the module
    docstring).

    Raises:
        ValueError: naming the prefix, when the documents hold no two-token document.
    """

    def __init__(self, dataset: IndexedDataset, documents: range, seq_len: int, seed: int,
                 source_id: int, cache_dir: str | os.PathLike[str] | None,
                 name: str = "") -> None:
        self.dataset, self.documents, self.seq_len = dataset, documents, seq_len
        self.seed, self.source_id = seed, source_id
        self.name = name or dataset.prefix
        lengths = dataset.document_lengths[documents.start:documents.stop]
        self.lengths = lengths
        self.tokens_per_epoch = int(lengths.sum())
        if len(lengths) == 0 or lengths.max() < 2:
            raise ValueError(f"data_path: {self.name!r} has no document of 2 tokens or more "
                             f"({len(lengths)} documents, {self.tokens_per_epoch} tokens): "
                             f"nothing to learn")
        # Sample slots are shuffled in blocks of an epoch's worth of samples.
        self.block = max(1, self.tokens_per_epoch // seq_len)
        self.cache = IndexCache(cache_dir, {
            "dataset": dataset_fingerprint(dataset),
            "documents": [documents.start, documents.stop], "seq_len": seq_len, "seed": seed,
            "source": source_id})
        # The epochs and slot blocks in use: a run moves forward through them, so a few of
        # each are kept (a block's slots reach into the next epoch).
        self._epochs: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = \
            collections.OrderedDict()
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def epochs_for(self, samples: int) -> float:
        """Epochs of this source that ``samples`` samples read."""
        return samples * self.seq_len / self.tokens_per_epoch

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, token end of each document in that order) of epoch ``e``."""
        if e not in self._epochs:
            order = self.cache.get(f"epoch-{e}-order", lambda: _permutation(
                len(self.lengths), self.seed, self.source_id, 0, e))
            ends = self.cache.get(f"epoch-{e}-ends",
                                  lambda: np.cumsum(self.lengths[order], dtype=np.int64))
            self._epochs[e] = (order, ends)
            if len(self._epochs) > KEPT_EPOCHS:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(e)
        return self._epochs[e]

    def slot_sample(self, slot: int) -> int:
        """The sample that slot ``slot`` of this source reads (slots shuffled in blocks)."""
        block, within = divmod(slot, self.block)
        if block not in self._blocks:
            self._blocks[block] = self.cache.get(f"block-{block}", lambda: _permutation(
                self.block, self.seed, self.source_id, 1, block))
            if len(self._blocks) > KEPT_EPOCHS:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(block)
        return block * self.block + int(self._blocks[block][within])

    def window(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (L + 1,) int64, starts (L + 1,) bool: a document begins there) of the
        sample in ``slot``."""
        length = self.seq_len + 1
        tokens = np.empty(length, np.int64)
        starts = np.zeros(length, bool)
        position = self.slot_sample(slot) * self.seq_len
        epoch, offset = divmod(position, self.tokens_per_epoch)
        order, ends = self.epoch(epoch)
        index = int(np.searchsorted(ends, offset, side="right"))
        within = offset - (int(ends[index]) - int(self.lengths[order[index]]))
        filled = 0
        data = self.dataset.tokens()
        first_document = self.documents.start
        while filled < length:
            if index == len(order):  # on into the next epoch's order
                epoch += 1
                order, ends = self.epoch(epoch)
                index = 0
            document = int(order[index])
            size = int(self.lengths[document])
            take = min(size - within, length - filled)
            if take > 0:
                start = self.dataset.document_start(first_document + document) + within
                tokens[filled:filled + take] = data[start:start + take]
                starts[filled] = within == 0
                filled += take
            index, within = index + 1, 0
        return tokens, starts


def pack(windows: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
         document_masking: bool = True) -> Batch:
    """Rows of ``seq_len`` tokens from windows of ``seq_len + 1`` (tokens, document starts;
    see the module docstring)."""
    tokens = (torch.from_numpy(np.stack([w[0] for w in windows])) if windows
              else torch.zeros(0, seq_len + 1, dtype=torch.int64))
    starts = (torch.from_numpy(np.stack([w[1] for w in windows])) if windows
              else torch.zeros(0, seq_len + 1, dtype=torch.bool))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].clone()
    rows, length = inputs.shape
    columns = torch.arange(length).expand(rows, length)
    if not document_masking:
        return Batch(inputs, labels, columns.contiguous())
    begins = starts[:, :-1].clone()
    begins[:, 0] = True  # each row starts a document, or a piece of one
    # position = column - the column of the latest document start at or before it
    last_start = torch.where(begins, columns, torch.zeros_like(columns)).cummax(dim=1).values
    labels[starts[:, 1:]] = -100  # a document's last token: its successor is another's
    return Batch(inputs, labels, (columns - last_start).contiguous())


@dataclass(frozen=True)
class _Split:
    """Which documents of a dataset train and which validate."""

    train: range
    valid: range


def split_documents(count: int, split: tuple[float, ...] | None) -> _Split:
    """The first documents train, the next validate (``split``: train, valid[, test]
    weights, Megatron's --split; the test share is not read here)."""
    if split is None:
        return _Split(range(count), range(count, count))
    share = shares(split)
    train_end = round(count * share[0])
    valid_end = round(count * (share[0] + share[1]))
    return _Split(range(train_end), range(train_end, valid_end))


def parse_split(text: str, arg: str = "split") -> tuple[float, ...]:
    """``"99,1"`` (or ``"969,30,1"``) to weights; ValueError naming ``arg``."""
    try:
        parts = tuple(float(p) for p in str(text).replace("/", ",").split(","))
    except ValueError:
        raise ValueError(f"{arg}: expected comma-separated weights like 99,1, got {text!r}"
                         ) from None
    if not 2 <= len(parts) <= 3 or any(not math.isfinite(p) or p < 0 for p in parts) or \
            parts[0] <= 0 or sum(parts) <= 0:
        raise ValueError(f"{arg}: expected train,valid[,test] weights >= 0 with a train share, "
                         f"got {text!r}")
    return parts


class Blend:
    """Sources with shares, and the global sample order over them (eurocore.data.blend)."""

    def __init__(self, sources: Sequence[SourceSamples], weights: Sequence[float]) -> None:
        self.sources, self.weights = list(sources), shares(weights)

    def windows(self, first: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        source, slot = blend(self.weights, first, count)
        return [self.sources[d].window(int(k)) for d, k in zip(source, slot, strict=True)]

    def samples_of(self, total: int) -> np.ndarray:
        """How many of the first ``total`` global samples each source serves, to within one
        (the blend keeps every prefix within a sample of the shares): ``total · w``."""
        return total * self.weights

    def epochs_at(self, total: int) -> list[float]:
        """Epochs each source has begun reading after the first ``total`` global samples
        (0-based: 1.3 is 30% into the second)."""
        return [source.epochs_for(n)
                for source, n in zip(self.sources, self.samples_of(total), strict=True)]


class CorpusSource:
    """Tokenized corpora as a ``TokenSource``: global batch s is global samples
    ``s·batch_size ..`` of the training blend, packed into rows; validation batch i the
    same of the validation blend (held-out documents of each source, ``split``, or separate
    prefixes, ``valid_data_path``).

    Args:
        data_path: Megatron's syntax (see ``eurocore.data.blend``).
        seq_len, batch_size: the rows of a global batch.
        seed: fixes every order.
        split: train,valid[,test] weights of each source's documents, or None.
        valid_data_path: validation prefixes (instead of a split).
        document_masking: positions restart and labels stop at document boundaries.
        cache_dir: where permutations are cached (None: not cached).
        planned_steps: the run's length, for the epochs line of :meth:`describe`.
        eval_samples: the samples an evaluation reads (:meth:`describe` says when the
            validation data is smaller).

    Raises:
        ValueError: naming ``data_path`` (or ``valid_data_path``, ``split``), for a missing
            or malformed dataset, a source with nothing to learn, or a bad syntax.
    """

    def __init__(self, data_path: Sequence[str], *, seq_len: int, batch_size: int,
                 seed: int = 0, split: str | None = None,
                 valid_data_path: Sequence[str] | None = None, document_masking: bool = True,
                 cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,
                 planned_steps: int = 0, eval_samples: int = 0) -> None:
        started = time.perf_counter()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.document_masking, self.loss_floor = document_masking, None
        self.split = parse_split(split) if split is not None else None
        if self.split is not None and valid_data_path:  # the one place of this rule
            raise ValueError("split: give a split or validation prefixes (valid_data_path), "
                             "not both")
        pairs = parse_data_path(data_path, "data_path")
        opened = {prefix: _open_dataset(prefix, "data_path", cache_dir) for _, prefix in pairs}
        datasets = {prefix: dataset for prefix, (dataset, _) in opened.items()}
        weights = [w if w is not None else datasets[p].num_tokens for w, p in pairs]
        splits = [split_documents(datasets[p].num_documents, self.split) for _, p in pairs]
        self.train = Blend([SourceSamples(datasets[p], s.train, seq_len, seed, d, cache_dir, p)
                            for d, ((_, p), s) in enumerate(zip(pairs, splits, strict=True))],
                           weights)
        self.valid: Blend | None = None
        if self.split is not None and self.split[1] > 0:
            self.valid = Blend([SourceSamples(datasets[p], s.valid, seq_len, seed, d,
                                              cache_dir, f"{p} (validation split)")
                                for d, ((_, p), s) in enumerate(zip(pairs, splits,
                                                                    strict=True))], weights)
        elif valid_data_path:
            valid_pairs = parse_data_path(valid_data_path, "valid_data_path")
            opened_valid = {p: _open_dataset(p, "valid_data_path", cache_dir)
                            for _, p in valid_pairs}
            opened.update(opened_valid)
            valid_sets = {p: dataset for p, (dataset, _) in opened_valid.items()}
            self.valid = Blend(
                [SourceSamples(valid_sets[p], range(valid_sets[p].num_documents), seq_len,
                               seed, d, cache_dir, p) for d, (_, p) in enumerate(valid_pairs)],
                [w if w is not None else valid_sets[p].num_tokens for w, p in valid_pairs])
        self.prefixes = [p for _, p in pairs]
        self.datasets = datasets
        self._facts = {p: facts for p, (_, facts) in opened.items()}
        self._epochs_said = [0] * len(self.train.sources)
        self.planned_steps, self.eval_samples = planned_steps, eval_samples
        # Epoch 0's index and the first block of slots now (from the cache, or built and
        # cached): loader processes forked from here share them, and the start-up line
        # says what they cost.
        for blend_ in (self.train, self.valid):
            for source in blend_.sources if blend_ is not None else ():
                source.epoch(0)
                source.slot_sample(0)
        self.build_seconds = time.perf_counter() - started

    def global_batch(self, step: int, rows: slice = slice(None)) -> Batch:
        first, stop, _ = rows.indices(self.batch_size)
        windows = self.train.windows(step * self.batch_size + first, max(0, stop - first))
        return pack(windows, self.seq_len, self.document_masking)

    def validation_batch(self, index: int, rows: slice = slice(None)) -> Batch | None:
        if self.valid is None:
            return None
        first, stop, _ = rows.indices(self.batch_size)
        windows = self.valid.windows(index * self.batch_size + first, max(0, stop - first))
        return pack(windows, self.seq_len, self.document_masking)

    def max_token_id(self) -> int:
        """The largest token id of every dataset: from its PREFIX.json, else from the
        cache's record, else read once and recorded."""
        return max(_max_token(self.datasets[p], self._facts[p]) for p in self.datasets)

    def tokenizers(self) -> dict[str, str]:
        """{prefix: sha256 of the tokenizer that made it} for the prepared datasets whose
        PREFIX.json says (Megatron-made ones do not)."""
        found = {}
        for prefix, dataset in self.datasets.items():
            sha = prepared_summary(dataset).get("tokenizer", {}).get("sha256")
            if sha:
                found[prefix] = sha
        return found

    def describe(self) -> str:
        epochs = self.train.epochs_at(self.planned_steps * self.batch_size)
        parts = [f"{source.name} {share:.1%} ({source.tokens_per_epoch:,} tokens, {e:.2f} "
                 f"epoch{'s' if e != 1 else ''} in this run)"
                 for source, share, e in zip(self.train.sources, self.train.weights, epochs,
                                             strict=True)]
        valid = "none" if self.valid is None else (
            "the split's held-out documents" if self.split else "separate prefixes")
        if self.valid is not None and self.eval_samples:
            reads = max(self.valid.epochs_at(self.eval_samples))
            if reads > 1:
                valid += (f" (the {self.eval_samples} validation samples read them "
                          f"{reads:.1f} times: fewer held-out tokens than an evaluation asks)")
        masking = "per document" if self.document_masking else "off (causal over the row)"
        cached = all(s.cache.hits and not s.cache.misses for s in self.train.sources)
        return (f"{len(parts)} source(s): {'; '.join(parts)}; validation: {valid}; "
                f"document masking {masking}; indices "
                f"{'read from the cache' if cached else 'built'} in {self.build_seconds:.2f} s")

    def progress(self, steps: int) -> list[str]:
        """A line for each source that has begun another epoch since the last call (the
        first call reports the epochs begun by then)."""
        epochs = [math.floor(e) for e in self.train.epochs_at(steps * self.batch_size)]
        lines = [f"{source.name} begins epoch {e + 1} (a fresh order of its documents) by "
                 f"step {steps}" for source, e, said in zip(self.train.sources, epochs,
                                                           self._epochs_said, strict=True)
                 if e > said]
        self._epochs_said = epochs
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {"source": "corpus", "prefixes": self.prefixes,
                "weights": [float(w) for w in self.train.weights],
                "documents": [d.num_documents for d in self.datasets.values()],
                "tokens": [d.num_tokens for d in self.datasets.values()],
                "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "split": list(self.split) if self.split else None,
                "document_masking": self.document_masking}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_data(state, self.state_dict())


def _open_dataset(prefix: str, arg: str, cache_dir: str | os.PathLike[str] | None
                  ) -> tuple[IndexedDataset, IndexCache]:
    """The dataset at ``prefix``, verified once per version of its files (the cache's
    record of its fingerprint says it passed; a later open skips the pass over the index),
    and that record. ValueError naming ``arg``."""
    try:
        dataset = IndexedDataset(prefix, verify=False)
        facts = IndexCache(cache_dir, {"dataset": dataset_fingerprint(dataset)})
        if not facts.record().get("verified"):
            dataset.verify()
            facts.update_record(verified=True)
        return dataset, facts
    except ValueError as err:
        raise ValueError(f"{arg}: {str(err).removeprefix('data: ')}") from None


def prepared_summary(dataset: IndexedDataset) -> dict[str, Any]:
    """``PREFIX.json`` of ``eurocore data prepare``, when it describes this index (same
    documents and tokens); {} for a Megatron-made or unmatched dataset."""
    path = Path(dataset.prefix + ".json")
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    same = (summary.get("documents") == dataset.num_documents
            and summary.get("tokens") == dataset.num_tokens)
    return summary if same else {}


def _max_token(dataset: IndexedDataset, facts: IndexCache) -> int:
    """The largest token id: from PREFIX.json, else the cache's record, else read (once
    per version of the files: recorded)."""
    summary = prepared_summary(dataset)
    if "max_token_id" in summary:
        return int(summary["max_token_id"])
    recorded = facts.record().get("max_token_id")
    if recorded is not None:
        return int(recorded)
    largest = dataset.max_token()
    facts.update_record(max_token_id=largest)
    return largest
