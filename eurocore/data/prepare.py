"""``eurocore data prepare``: text files to a Megatron indexed dataset.

    eurocore data prepare --input corpus/fi/*.jsonl.zst --tokenizer tok/ \\
        --output-prefix data/web_fi --workers 8

Inputs, compressed or not (``.gz``, ``.zst``): JSON Lines (``.jsonl``, ``.json``,
``.ndjson``; the text under ``--text-key``), Parquet (``.parquet``; the ``--text-key``
column), and anything else as plain text: one document per file, or one per line with
``--line-docs``. Every document is encoded with the tokenizer (without its special tokens,
unless ``--add-special-tokens``) and followed by one end-of-document token. Documents whose
text is empty or blank are skipped and counted.

Output: ``PREFIX.bin`` + ``PREFIX.idx`` (``eurocore.data.indexed``; uint16 tokens when the
vocabulary fits, else int32) and ``PREFIX.json``, the summary: documents, tokens, bytes,
the largest token id, the tokenizer (name, sha256, vocabulary, EOS) and the inputs. The
files appear only when complete; a bad input stops the run with an error naming the file
and line (or row), and leaves nothing behind. Worker processes tokenize in parallel; the
output is the same whatever their number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import io
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from eurocore.data.indexed import IndexedDatasetWriter, token_dtype
from eurocore.data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from eurocore.utils.checks import check_int
from eurocore.utils.files import check_writable_dir, write_json_atomically

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")
# Documents per task sent to a worker: large enough to amortise the transfer, small enough
# to keep every worker busy and the progress line moving.
TASK_DOCUMENTS = 512


@dataclass(frozen=True)
class Record:
    """One document's raw form: its file, where in it ("line 12", "row 3", "file"), and
    either a JSON line (bytes, parsed in a worker) or the text."""

    path: str
    where: str
    json_line: bytes | None = None
    text: str | None = None


class _CountingReader(io.RawIOBase):
    """A raw file that counts the bytes read from it (compressed bytes, for progress)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _format(path: str) -> tuple[str, str | None]:
    """("json" | "parquet" | "text", the compression suffix or None)."""
    name = path.lower()
    compression = next((c for c in COMPRESSED if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    if name.endswith(JSON_SUFFIXES):
        return "json", compression
    if name.endswith(".parquet"):
        return "parquet", compression
    return "text", compression


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a zstd file, frame after frame; a file that ends inside a
    frame raises EOFError (zstandard's stream reader would just stop there, and the rest of
    the corpus would be lost without a word)."""

    def __init__(self, raw: io.RawIOBase, zstandard) -> None:
        self.raw, self.zstandard = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""
        self.inside = False  # a frame has begun and not ended

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.inside:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._feed(chunk)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            self.inside = True
            self.pending += self.frame.decompress(chunk)
            if not self.frame.eof:
                return
            chunk = self.frame.unused_data  # the next frame begins here
            self.frame = self.zstandard.ZstdDecompressor().decompressobj()
            self.inside = False

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open(path: str, compression: str | None) -> tuple[BinaryIO, _CountingReader]:
    raw = _CountingReader(open(path, "rb"))  # noqa: SIM115 (closed with the stream)
    if compression == ".gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw)), raw
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise ValueError(f"input: {path!r} is zstd-compressed and needs the 'zstandard' "
                             f"package (pip install 'eurocore[data]')") from None
        return io.BufferedReader(_ZstdFrames(raw, zstandard)), raw
    return io.BufferedReader(raw), raw


def read_records(path: str, *, text_key: str, line_docs: bool,
                 consumed: list[int]) -> Iterator[Record]:
    """The documents of one input file, in order; ``consumed[0]`` follows the (compressed)
    bytes read, for progress. Raises ValueError naming the file (and line) it cannot read."""
    kind, compression = _format(path)
    if kind == "parquet":
        yield from _parquet_records(path, text_key, compression, consumed)
        return
    try:
        stream, raw = _open(path, compression)
    except OSError as err:
        raise ValueError(f"input: cannot read {path!r} ({err.strerror or err})") from None
    try:
        with stream:
            if kind == "text" and not line_docs:
                data = stream.read()
                consumed[0] = raw.count
                yield Record(path, "file", text=_decode(data, path, "file"))
                return
            for number, line in enumerate(stream, start=1):
                consumed[0] = raw.count
                if kind == "json":
                    if line.strip():
                        yield Record(path, f"line {number}", json_line=line)
                else:
                    yield Record(path, f"line {number}",
                                 text=_decode(line, path, f"line {number}").rstrip("\r\n"))
    except (OSError, EOFError, zlib.error) as err:  # unreadable, truncated or corrupt
        raise ValueError(f"input: cannot read {path!r} ({getattr(err, 'strerror', None) or err})"
                         ) from None
    except Exception as err:
        if type(err).__module__.startswith("zstandard"):
            raise ValueError(f"input: cannot read {path!r} (zstd: {err})") from None
        raise


def _decode(data: bytes, path: str, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"input: {path}: {where}: not UTF-8 text ({err.reason} at byte "
                         f"{err.start})") from None


def _parquet_records(path: str, text_key: str, compression: str | None,
                     consumed: list[int]) -> Iterator[Record]:
    if compression:
        raise ValueError(f"input: {path!r}: Parquet compresses itself; a {compression} "
                         f"around it is not read")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"input: {path!r} is Parquet and needs the 'pyarrow' package (pip "
                         f"install 'eurocore[data]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's own error types
        raise ValueError(f"input: cannot read {path!r} as Parquet ({err})") from None
    if text_key not in parquet.schema_arrow.names:
        raise ValueError(f"input: {path!r} has no column {text_key!r} (columns: "
                         f"{', '.join(parquet.schema_arrow.names)}); see --text-key")
    row = 0
    for batch in parquet.iter_batches(columns=[text_key]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise ValueError(f"input: {path}: row {row}: {text_key!r} is a "
                                 f"{type(text).__name__}, not a string")
            yield Record(path, f"row {row}", text=text or "")
    consumed[0] = os.path.getsize(path)


# --- workers -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer_path: str, text_key: str, add_special_tokens: bool, eos_id: int,
                  dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), text_key=text_key,
                   special=add_special_tokens, eos=eos_id, dtype=np.dtype(dtype))


def _tokenize(records: list[Record]) -> tuple[np.ndarray, np.ndarray, int]:
    """(lengths, tokens back to back, empty documents skipped) of a task's records."""
    texts = []
    for record in records:
        text = record.text if record.json_line is None else _json_text(record)
        if text.strip():
            texts.append(text)
    empty = len(records) - len(texts)
    encodings = _WORKER["tokenizer"].encode_batch(texts, add_special_tokens=_WORKER["special"])
    ids = [np.append(np.asarray(e.ids, np.int64), _WORKER["eos"]) for e in encodings]
    lengths = np.array([len(i) for i in ids], np.int64)
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    dtype = _WORKER["dtype"]
    if tokens.size and tokens.max() > np.iinfo(dtype).max:
        raise ValueError(f"tokenizer: produced id {tokens.max()}, beyond {dtype.name}'s "
                         f"{np.iinfo(dtype).max} (the vocabulary size it reported is wrong)")
    return lengths, tokens.astype(dtype), empty


def _json_text(record: Record) -> str:
    where = f"input: {record.path}: {record.where}"
    try:
        value = json.loads(record.json_line)
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    key = _WORKER["text_key"]
    if not isinstance(value, dict) or key not in value:
        keys = ", ".join(map(repr, value)) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where}: no {key!r} key (found {keys}); see --text-key")
    if value[key] is None:  # no text: an empty document, as a null Parquet cell
        return ""
    if not isinstance(value[key], str):
        raise ValueError(f"{where}: {key!r} is a {type(value[key]).__name__}, not a string")
    return value[key]


# --- the tool ------------------------------------------------------------------------------


class _Progress:
    """One status line: documents and tokens per second, the share of the input read, ETA.
    On a terminal it redraws in place; elsewhere it prints a line every 10 s."""

    def __init__(self, total_bytes: int, stream=None, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = max(total_bytes, 1), stream or sys.stderr, enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.monotonic()

    def update(self, documents: int, tokens: int, read: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        share = min(read / self.total, 1.0)
        eta = elapsed * (1 - share) / share if share > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        line = (f"prepare: {documents:,} documents ({documents / elapsed:,.0f}/s), "
                f"{tokens:,} tokens ({tokens / elapsed:,.0f}/s), {share:.0%} of the input, "
                f"ETA {eta_text}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream)


def prepare(inputs: Sequence[str], tokenizer: str, output_prefix: str, *,
            text_key: str = "text", line_docs: bool = False, workers: int = 1,
            eos_token: str | None = None, add_special_tokens: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenizes ``inputs`` into ``output_prefix``.bin/.idx/.json (see the module docstring);
    returns the summary (also written as ``output_prefix``.json).

    Raises:
        ValueError: naming the argument, the file and line or row: a missing or unreadable
            input, invalid JSON, a missing text key, an empty corpus, a tokenizer whose ids
            do not fit. Nothing is left behind then.
    """
    if not inputs:
        raise ValueError("input: no input files")
    check_int("workers", workers, minimum=1)
    for path in inputs:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ValueError(f"input: {path!r} is not a readable file")
    info = tokenizer_info(tokenizer, eos_token)
    dtype = token_dtype(info.vocab_size)
    prefix = Path(output_prefix)
    if not prefix.name or str(output_prefix).endswith(("/", os.sep)) or prefix.is_dir():
        raise ValueError(f"output_prefix: {output_prefix!r} names a directory; give a "
                         f"prefix (PREFIX.bin, PREFIX.idx and PREFIX.json are written)")
    for suffix in (".bin", ".idx", ".json"):
        if Path(str(prefix) + suffix).is_dir():
            raise ValueError(f"output_prefix: {str(prefix) + suffix!r} is a directory")
    check_writable_dir("output_prefix", prefix.parent)
    created = _missing_directories(prefix.parent)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes = [os.path.getsize(p) for p in inputs]
    status = _Progress(sum(sizes), enabled=progress)
    counts = {"documents": 0, "empty": 0, "tokens": 0, "max_token_id": -1}
    started = time.monotonic()
    done_bytes, consumed = [0], [0]
    writer = IndexedDatasetWriter(prefix, dtype)
    context = multiprocessing.get_context("fork" if "fork" in
                                          multiprocessing.get_all_start_methods() else "spawn")
    init = (str(tokenizer), text_key, add_special_tokens, info.eos_id, dtype.name)
    try:
        with context.Pool(workers, _start_worker, init) as pool:
            tasks = _tasks(inputs, sizes, text_key, line_docs, consumed, done_bytes)
            for lengths, tokens, empty in pool.imap(_tokenize, tasks):
                writer.add_documents(lengths, tokens)
                counts["documents"] += len(lengths)
                counts["empty"] += empty
                counts["tokens"] += int(tokens.size)
                if tokens.size:
                    counts["max_token_id"] = max(counts["max_token_id"], int(tokens.max()))
                status.update(counts["documents"], counts["tokens"], done_bytes[0] + consumed[0])
        if counts["documents"] == 0:
            raise ValueError(f"input: no documents in {len(inputs)} file(s) "
                             f"({counts['empty']} empty or blank ones skipped)")
        status.update(counts["documents"], counts["tokens"], sum(sizes), force=True)
        summary: dict[str, Any] = {}

        def write_summary() -> None:  # before the .idx: a dataset always has its summary
            summary.update(_summary(counts, dtype, info, inputs, sizes, prefix, text_key,
                                    line_docs, add_special_tokens, time.monotonic() - started))
            write_json_atomically(summary, str(prefix) + ".json")

        writer.finish(before_index=write_summary)
    except BaseException:
        writer.abort()
        for directory in created:  # the deepest first; only if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        status.close()
    return summary


def _missing_directories(path: Path) -> list[Path]:
    """The directories of ``path`` that do not exist yet, the deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _tasks(inputs, sizes, text_key, line_docs, consumed, done_bytes) -> Iterator[list[Record]]:
    """The records of every input, in order, in lists of TASK_DOCUMENTS."""
    task: list[Record] = []
    for path, size in zip(inputs, sizes, strict=True):
        consumed[0] = 0
        for record in read_records(path, text_key=text_key, line_docs=line_docs,
                                   consumed=consumed):
            task.append(record)
            if len(task) == TASK_DOCUMENTS:
                yield task
                task = []
        done_bytes[0] += size
        consumed[0] = 0
    if task:
        yield task


def _summary(counts, dtype, info: TokenizerInfo, inputs, sizes, prefix, text_key, line_docs,
             add_special_tokens, seconds) -> dict[str, Any]:
    from eurocore import __version__

    documents = counts["documents"]
    return {
        "documents": documents,
        "empty_documents_skipped": counts["empty"],
        "tokens": counts["tokens"],
        "tokens_per_document": counts["tokens"] / documents,
        "max_token_id": counts["max_token_id"],
        "bin_bytes": os.path.getsize(str(prefix) + ".bin"),
        "dtype": dtype.name,
        "tokenizer": info.as_dict(),
        "inputs": [{"path": p, "bytes": s} for p, s in zip(inputs, sizes, strict=True)],
        "text_key": text_key,
        "line_docs": line_docs,
        "add_special_tokens": add_special_tokens,
        "seconds": round(seconds, 3),
        "eurocore": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def format_summary(summary: dict[str, Any], prefix: str) -> str:
    """The end-of-run summary as a few lines."""
    seconds = max(summary["seconds"], 1e-9)
    return (f"wrote {prefix}.bin/.idx/.json: {summary['documents']:,} documents "
            f"({summary['empty_documents_skipped']:,} empty skipped), {summary['tokens']:,} "
            f"tokens ({summary['tokens_per_document']:,.1f} per document), "
            f"{summary['bin_bytes']:,} bytes of {summary['dtype']}; "
            f"{summary['tokens'] / seconds:,.0f} tokens/s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``eurocore data prepare``."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="JSON Lines, Parquet or text files, .gz/.zst compressed or not")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a Hugging Face tokenizer: a directory with tokenizer.json, or "
                             "the file")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    parser.add_argument("--text-key", default="text",
                        help="the JSON key or Parquet column holding the text (default text)")
    parser.add_argument("--line-docs", action="store_true",
                        help="plain text: one document per line (default: per file)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizing processes (default 1)")
    parser.add_argument("--eos-token", default=None,
                        help="the end-of-document token (default: the tokenizer's)")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="let the tokenizer add its special tokens (a BOS, say) to each "
                             "document")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    """Runs ``prepare`` for parsed arguments; prints the summary."""
    summary = prepare(args.input, args.tokenizer, args.output_prefix, text_key=args.text_key,
                      line_docs=args.line_docs, workers=args.workers, eos_token=args.eos_token,
                      add_special_tokens=args.add_special_tokens, progress=not args.quiet)
    print(format_summary(summary, args.output_prefix))
    return 0
