"""Megatron-LM's indexed dataset format (``MMIDIDX``, version 1): a reader that maps the files
lazily and a writer that publishes them only when complete.

``PREFIX.bin`` holds the token ids of every sequence back to back, in one dtype.
``PREFIX.idx`` describes them, little-endian:

    magic       9 bytes   b"MMIDIDX\\x00\\x00"
    version     uint64    1
    dtype       uint8     code of the token dtype (DTYPE_CODES)
    sequences   uint64    S
    boundaries  uint64    D + 1
    lengths     int32[S]  tokens of each sequence
    pointers    int64[S]  byte offset of each sequence in .bin
    documents   int64[D + 1]  the sequence each document starts at, then S

Megatron's GPT preprocessing writes one sequence per document (boundaries 0, 1, ..., S);
sentence-split corpora have several. Here a document is the span of its sequences, which
must lie back to back in ``.bin`` (as every writer lays them out).
"""

from __future__ import annotations

import collections
import os
import struct
import threading
import weakref
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
    4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.float64),
    7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, boundaries
# Token files kept mapped at once, across every dataset of the process: a blend of
# thousands of prefixes maps them as they are read and unmaps the least recently used.
MAX_OPEN_MAPS = 64
# Indexes from this size on are memory-mapped rather than read (about 800,000 documents).
MAP_INDEX_BYTES = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx)."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class _OpenMaps:
    """The process's mapped token files, least recently used first; at most MAX_OPEN_MAPS
    (each holds a file descriptor). Weak references: a dataset nobody uses is freed."""

    def __init__(self) -> None:
        self._maps: collections.OrderedDict[int, weakref.ref] = collections.OrderedDict()
        self._lock = threading.Lock()

    def touch(self, dataset: IndexedDataset) -> None:
        with self._lock:
            key = id(dataset)
            if key not in self._maps:
                self._maps[key] = weakref.ref(dataset, lambda _, key=key: self._drop(key))
            self._maps.move_to_end(key)
            while len(self._maps) > MAX_OPEN_MAPS:
                _, oldest = self._maps.popitem(last=False)
                if (alive := oldest()) is not None:
                    alive._unmap()

    def _drop(self, key: int) -> None:
        with self._lock:
            self._maps.pop(key, None)

    def forget(self, dataset: IndexedDataset) -> None:
        with self._lock:
            self._maps.pop(id(dataset), None)


_OPEN_MAPS = _OpenMaps()


class IndexedDataset:
    """A read-only ``PREFIX.bin`` / ``PREFIX.idx`` pair.

    The index's arrays are views of its bytes, mapped when large (MAP_INDEX_BYTES: shared
    with every process that maps it) and read when small; the token file is mapped on first
    use and may be unmapped again when many datasets are open (see MAX_OPEN_MAPS), so
    thousands of prefixes can be opened at once.

    Attributes:
        prefix: the path without suffix.
        dtype: the token dtype.
        sequence_lengths (S,) int32, sequence_pointers (S,) int64 byte offsets,
        document_indices (D + 1,) int64: the index's arrays (views of the mapped file).
        document_lengths (D,): each document's tokens (the sequence lengths themselves
        when every document is one sequence). ``document_start(d)`` is its first token.

    Raises:
        ValueError: naming the file, when a file is missing, not this format, truncated, or
            inconsistent (pointers beyond the token file, documents out of order).
    """

    def __init__(self, prefix: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise ValueError(f"data: {str(path)!r} does not exist (a dataset is a "
                                 f".bin/.idx pair; see 'eurocore data prepare')")
        self._read_index(verify)
        self._tokens: np.memmap | None = None

    def _read_index(self, verify: bool) -> None:
        where = repr(str(self.idx_path))
        size = self.idx_path.stat().st_size
        with self.idx_path.open("rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != MAGIC:
            raise ValueError(f"data: {where} is not a Megatron indexed dataset (no MMIDIDX "
                             f"header)")
        _, version, code, sequences, boundaries = _HEADER.unpack(header)
        if version != VERSION:
            raise ValueError(f"data: {where} is version {version}; this reader takes "
                             f"version {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"data: {where} has token dtype code {code}; known codes "
                             f"{sorted(DTYPE_CODES)}")
        self.dtype = DTYPE_CODES[code]
        need = _HEADER.size + 4 * sequences + 8 * sequences + 8 * boundaries
        if size < need or boundaries < 1:
            raise ValueError(f"data: {where} is truncated: {size} bytes for {sequences} "
                             f"sequences and {boundaries} document boundaries ({need} needed)")
        # A large index is mapped, not read: the page cache then holds it once for every
        # rank and worker. A small one is read (a map holds a file descriptor for as long
        # as its arrays live, and a blend may open thousands of small shards).
        index = (np.memmap(self.idx_path, np.uint8, "r", shape=(size,))
                 if size >= MAP_INDEX_BYTES else np.frombuffer(self.idx_path.read_bytes(),
                                                               np.uint8))
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, sequences, offset)
        offset += 4 * sequences
        self.sequence_pointers = np.frombuffer(index, np.int64, sequences, offset)
        offset += 8 * sequences
        self.document_indices = np.frombuffer(index, np.int64, boundaries, offset)
        if verify:
            self.verify()
        elif len(self.document_indices) == len(self.sequence_lengths) + 1:
            # Trusted (verified before, by the caller's record): one sequence per document.
            self.document_lengths = self.sequence_lengths
            self._document_pointers = self.sequence_pointers
        else:
            self.verify()

    def verify(self) -> None:
        """Checks the index against itself and the token file (a pass over the index);
        raises ValueError naming the file. Opening verifies unless ``verify=False`` (a
        caller that recorded an earlier check of the same files)."""
        self._check_consistency(repr(str(self.idx_path)))

    def _check_consistency(self, where: str) -> None:
        lengths, pointers, docs = (self.sequence_lengths, self.sequence_pointers,
                                   self.document_indices)
        itemsize = self.dtype.itemsize
        bin_bytes = self.bin_path.stat().st_size
        if len(lengths) and (lengths.min() < 0 or pointers.min() < 0 or (
                pointers + lengths.astype(np.int64) * itemsize).max() > bin_bytes):
            raise ValueError(f"data: {where} points past the end of "
                             f"{str(self.bin_path)!r} ({bin_bytes} bytes): the pair does not "
                             f"belong together, or the .bin is truncated")
        if docs[0] != 0 or docs[-1] != len(lengths) or (np.diff(docs) < 0).any():
            raise ValueError(f"data: {where}: document boundaries must run from 0 to the "
                             f"{len(lengths)} sequences without decreasing")
        if len(docs) == len(lengths) + 1 and (np.diff(docs) == 1).all():
            # One sequence per document (Megatron's GPT layout; boundaries 0, 1, ..., S):
            # the index's own arrays serve, nothing is copied.
            self.document_lengths = lengths
            self._document_pointers = pointers
            return
        first, last = docs[:-1], docs[1:]
        nonempty = last > first
        self._document_pointers = np.zeros(len(first), np.int64)
        self._document_pointers[nonempty] = pointers[first[nonempty]]
        ends = np.cumsum(lengths.astype(np.int64))
        starts_of_sequences = ends - lengths
        self.document_lengths = np.zeros(len(first), np.int64)
        self.document_lengths[nonempty] = (ends[last[nonempty] - 1]
                                           - starts_of_sequences[first[nonempty]])
        # a document's sequences lie back to back: pointer steps equal lengths inside it
        if len(lengths) > 1:
            steps = np.diff(pointers) // itemsize
            inside = np.ones(len(lengths) - 1, bool)
            inside[docs[1:-1][docs[1:-1] > 0] - 1] = False  # a step into the next document
            if (steps[inside] != lengths[:-1][inside]).any():
                raise ValueError(f"data: {where}: a document's sequences are not back to "
                                 f"back in {str(self.bin_path)!r}; this reader takes "
                                 f"contiguous documents")

    def document_start(self, index: int) -> int:
        """The element offset in ``.bin`` of document ``index``'s first token."""
        return int(self._document_pointers[index]) // self.dtype.itemsize

    # --- sizes ---------------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    # --- tokens --------------------------------------------------------------------------

    def tokens(self) -> np.memmap:
        """The whole token file, mapped read-only (mapped now if it was not)."""
        if self._tokens is None:
            size = self.bin_path.stat().st_size // self.dtype.itemsize
            self._tokens = (np.memmap(self.bin_path, self.dtype, "r", shape=(size,))
                            if size else np.zeros(0, self.dtype))
        _OPEN_MAPS.touch(self)
        return self._tokens

    def sequence(self, index: int) -> np.ndarray:
        """The tokens of sequence ``index`` (a copy)."""
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize
        return np.array(self.tokens()[start:start + int(self.sequence_lengths[index])])

    def document(self, index: int) -> np.ndarray:
        """The tokens of document ``index`` (a copy)."""
        start = self.document_start(index)
        return np.array(self.tokens()[start:start + int(self.document_lengths[index])])

    def max_token(self, chunk: int = 1 << 26) -> int:
        """The largest token id in the file (-1 when empty), read in chunks."""
        tokens = self.tokens()
        return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)),
                   default=-1)

    def _unmap(self) -> None:
        self._tokens = None  # numpy closes the map when the last view goes

    def close(self) -> None:
        """Unmaps the token file (it is mapped again if read)."""
        _OPEN_MAPS.forget(self)
        self._unmap()

    def __getstate__(self) -> dict:  # worker processes map the files themselves
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], verify=False)  # the process that sent it verified

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, "
                f"{self.num_tokens} tokens, {self.dtype.name})")


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin`` and ``PREFIX.idx``, one sequence per document, through
    temporary files renamed into place by :meth:`finish` (the ``.idx`` last): an
    interrupted writer leaves no ``.idx``, so nothing that looks like a dataset.

        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(tokens)
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        codes = {d: c for c, d in DTYPE_CODES.items()}
        if self.dtype not in codes:
            raise ValueError(f"dtype: expected one of {[d.name for d in codes]}, got "
                             f"{self.dtype}")
        self._code = codes[self.dtype]
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = self._bin_tmp.open("wb")
        self._lengths: list[int] = []
        self.finished = False

    def add_document(self, tokens: np.ndarray) -> None:
        """Appends one document (one sequence) of token ids; checked to fit the dtype."""
        tokens = np.asarray(tokens)
        if tokens.size and np.issubdtype(tokens.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if tokens.min() < info.min or tokens.max() > info.max:
                raise ValueError(f"tokens: ids {tokens.min()}..{tokens.max()} do not fit "
                                 f"{self.dtype.name}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(tokens.size))

    def add_documents(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Appends many documents at once: ``tokens`` back to back, ``lengths`` each
        (already in this writer's dtype, as worker processes send them)."""
        self._bin.write(np.ascontiguousarray(tokens, self.dtype).tobytes())
        self._lengths.extend(int(n) for n in lengths)

    def finish(self, before_index=None) -> None:
        """Writes the index and renames both files into place, the ``.idx`` last;
        ``before_index()`` runs between the two (a summary file that a dataset must never
        lack: until the ``.idx`` is in place there is no dataset)."""
        self._bin.close()
        lengths = np.asarray(self._lengths, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with self._idx_tmp.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(documents)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(documents.tobytes())
        # An older .idx must not pair with the new .bin if we stop between the renames.
        self.idx_path.unlink(missing_ok=True)
        os.replace(self._bin_tmp, self.bin_path)
        if before_index is not None:
            before_index()
        os.replace(self._idx_tmp, self.idx_path)
        self.finished = True

    def abort(self) -> None:
        """Removes the temporary files; nothing is published."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None and not self.finished:
            self.finish()
        elif kind is not None:
            self.abort()
