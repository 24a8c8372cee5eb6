"""The data pipeline benchmark: ``python -m eurocore.benchmarks.data``.

    python -m eurocore.benchmarks.data [--parts prepare index loader] [--sizes 1e8 1e9]
        [--quick] [--out DIR] [--workdir DIR] [--keep] [--tokenizer PATH]

Three parts, each figure printed beside the same work done by megatron-core where it is
installed (its rows say "not installed" otherwise). All the work is the host CPU's: on a
machine without a GPU the figures are what this CPU does (the table says so); on a
training node they are that node's.

prepare
    ``eurocore.data.prepare.prepare`` on a synthetic multilingual JSON Lines corpus written
    by the benchmark (Finnish, Russian, Greek, Chinese, Japanese, French, Polish, German
    and English word salad, emoji; a fixed seed), with 1 and 2 worker processes. The
    tokenizer is ``--tokenizer``, else a byte-level BPE trained on the spot on the corpus.
    Timed: the whole call (reading, JSON parsing, tokenizing, writing .bin/.idx/.json,
    start-up of the workers). Counted: the tokens written (end-of-document tokens
    included); tokens/s is also given per worker, and the input's bytes/s. Reference:
    Megatron-LM's ``tools/preprocess_data.py`` loop (not part of megatron-core) re-created
    around megatron-core's ``IndexedDatasetBuilder``: a pool of as many workers mapping
    ``json.loads`` + ``Tokenizer.encode`` + EOD over the lines (``imap``, chunks of 32),
    ``add_document`` per document, ``finalize``; same tokenizer library and files, and the
    outputs are compared byte for byte.

index
    For each of ``--sizes`` (tokens; default 1e8 and 1e9): a synthetic ``.bin``/``.idx``
    pair of random uint16 tokens (ids 1..49999), document lengths drawn from a lognormal
    with mean 600 tokens (sigma 1, at least 2), each document ending in the EOD token 0.
    Timed first, "write": ``IndexedDatasetWriter.add_documents`` over chunks of 16 Mi
    tokens + ``finish``, beside ``IndexedDatasetBuilder.add_document`` per document +
    ``finalize`` writing the same documents (token generation excluded from both; the two
    files are compared byte for byte and the reference's copy removed). Then "build",
    cold cache: constructing ``CorpusSource([prefix], seq_len=4096, batch_size=ROWS,
    cache_dir=<fresh directory>)`` (ROWS: ``--rows``, default 8; this reads (or maps) and
    checks the index and builds epoch 0's document permutation and cumulative ends) and
    producing global batch 0 (the first block of shuffled sample slots, and the packed
    rows); "build", warm cache: the same again with that cache directory filled. Each
    build is timed three times (cold: three fresh directories) and the median reported;
    the cache files a cold build computes are written by background threads, which the
    benchmark waits for after the timing (a run does not wait for them). Reference:
    megatron-core's ``IndexedDataset`` load + ``GPTDataset`` construction (one epoch:
    document index, ``helpers.build_sample_idx``, shuffle index, saved to
    ``path_to_cache``) + ``__getitem__`` of the same number of rows; warm: the same with its
    cache filled. Page cache: the files were just written, so reads hit memory on both
    sides.

loader
    ``eurocore.data.loader.prefetch(source, slice(0, ROWS), ...)`` over ``--steps`` steps
    of a rank's ROWS rows of seq_len 4096 (global batch ROWS x 8, rank 0 of 8; default
    1000 steps of 8 rows), with 0 and 2 worker processes, on a synthetic 1e8-token pair as
    above, document masking on, the epoch-0 indices built before the timing on both sides.
    Counted: the rank's input tokens (ROWS x 4096 per step) after the first step arrives,
    over the time since then (the first step's wait, worker start-up included, is reported
    as ``first_batch_s``). Reference: megatron-core's ``GPTDataset.__getitem__`` loop over
    the same rows (``reset_position_ids`` and ``eod_mask_loss`` on, no attention mask: the
    same positions and loss mask), collated by torch's ``default_collate``; with workers,
    through ``torch.utils.data.DataLoader`` with a batch sampler, as Megatron-LM loads.
    Goal: 70,000 tokens/s per rank (ten times the ~7k tokens/s a 9B model consumes per
    H100).

JSON: ``<out>/<date>-<device-slug>-data.json``, written atomically after each part (a run
cut short keeps what it measured), with the environment, settings, method and peak memory.
Disk: the synthetic files of one size at a time, twice while megatron-core's copy is
compared (about 4 GB at 1e9 tokens), all removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from eurocore.data.corpus import CorpusSource, IndexCache
from eurocore.data.example import train_tokenizer
from eurocore.data.indexed import IndexedDatasetWriter, token_dtype
from eurocore.data.loader import prefetch
from eurocore.data.prepare import prepare
from eurocore.data.tokenizer import load_tokenizer, tokenizer_info
from eurocore.utils.files import check_writable_dir, write_json_atomically

from . import harness

SCHEMA_VERSION = 1
DEFAULT_OUT = "benchmarks/results"
PARTS = ("prepare", "index", "loader")
SEQ_LEN = 4096
RANKS = 8                      # the loader's global batch is ROWS x RANKS; we are rank 0
EOD = 0                        # the synthetic files' end-of-document token
VOCAB = 50_000                 # synthetic token ids 1 .. VOCAB - 1 (uint16)
DOC_MEAN, DOC_SIGMA = 600, 1.0  # lognormal document lengths (mean, sigma of the log)
CHUNK_TOKENS = 1 << 24         # synthetic tokens generated and written per chunk
PREPARE_WORKERS = (1, 2)
LOADER_WORKERS = (0, 2)
GOAL_LOADER_TOKENS_PER_S = 70_000
BUILD_REPEATS = 3              # index builds timed per case; the median is reported
TOKENIZER_VOCAB = 8192
EOS = "</s>"

# Default and --quick settings.
DEFAULTS = {"sizes": (100_000_000, 1_000_000_000), "rows": 8, "steps": 1000,
            "prepare_bytes": 32 << 20, "loader_tokens": 100_000_000}
QUICK = {"sizes": (200_000, 1_000_000), "rows": 2, "steps": 4,
         "prepare_bytes": 256 << 10, "loader_tokens": 200_000}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _tokens_label(n: int) -> str:
    """1e8 for 100000000, 2.5e5 for 250000; the digits where three significant digits
    do not say it exactly."""
    mantissa, exponent = f"{n:.2e}".split("e")
    short = f"{float(mantissa):g}e{int(exponent)}"
    return short if float(short) == n else f"{n:,}"


# --- megatron-core, optional ----------------------------------------------------------------


def load_megatron() -> tuple[SimpleNamespace | None, str]:
    """(the megatron-core pieces the reference rows use, its version) or (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers
            from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
            from megatron.core.datasets.indexed_dataset import (
                IndexedDataset,
                IndexedDatasetBuilder,
            )
            from megatron.core.datasets.utils import Split
    except ImportError as err:
        return None, f"not installed ({_first_line(err)})"
    except Exception as err:  # a broken install: say so, measure eurocore anyway
        return None, f"unavailable ({_first_line(err)})"
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        version = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        version = "unknown version"
    return SimpleNamespace(helpers=helpers, GPTDataset=GPTDataset,
                           GPTDatasetConfig=GPTDatasetConfig, IndexedDataset=IndexedDataset,
                           IndexedDatasetBuilder=IndexedDatasetBuilder, Split=Split,
                           version=version), f"megatron-core {version}"


class _MegatronTokenizer:
    """What GPTDataset asks of a tokenizer: the EOD id, a vocabulary size, an identity."""

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod = self.eos = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "eurocore-benchmark", "eod": eod,
                                   "vocab_size": vocab_size}


def _megatron_dataset(mt: SimpleNamespace, prefix: str, cache_dir: Path,
                      num_samples: int | None) -> Any:
    """megatron-core's IndexedDataset and GPTDataset over ``prefix`` (one epoch when
    ``num_samples`` is None), its indices cached under ``cache_dir``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = mt.GPTDatasetConfig(
            random_seed=0, sequence_length=SEQ_LEN, blend=([prefix], None), split="1,0,0",
            path_to_cache=str(cache_dir), tokenizer=_MegatronTokenizer(EOD, VOCAB),
            reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True,
            create_attention_mask=False)
        indexed = mt.IndexedDataset(prefix, multimodal=False, mmap=True)
        indices = np.arange(len(indexed.sequence_lengths), dtype=np.int32)
        return mt.GPTDataset(indexed, prefix, indices, num_samples, mt.Split.train, config)


# --- results ----------------------------------------------------------------------------------


def _skipped(reason: str) -> dict[str, Any]:
    status = "not installed" if reason.startswith("not installed") else "unavailable"
    return {"status": status, "reason": reason}


def _measure(fn: Callable[[], dict[str, Any]], log: harness.StageLog, what: str) -> dict[str, Any]:
    """``fn()``'s figures with status "ok", or status "failed" and the error."""
    try:
        with log.stage(what):
            return {"status": "ok", **fn()}
    except Exception as err:  # one failure is reported; the other rows still run
        log(f"{what}: FAILED: {_first_line(err)}")
        return {"status": "failed", "reason": _first_line(err)}


# --- the synthetic corpus and tokenizer (prepare) ---------------------------------------------

# Syllables per language; words are 1-4 of them. CJK words join without spaces.
_SYLLABLES = {
    "fi": "ka ta pä vää hy ää lo kyl mä sa nen ssa llä ö ju na ki ri tu li ko ne jo si vi",
    "ru": "при вет мир ско ва ния жи знь ть ый ка ро до ла ми ве ст ен ой бы ло за",
    "el": "κα λη μέ ρα κό σμε αυ τή εί ναι πρό τα ση ελ λη νι κή το υς θα μα",
    "zh": "的 一 是 不 了 人 我 在 有 他 这 中 大 来 上 国 个 到 说 们 为 子 和 你 地 出 道",
    "ja": "あ い う え お か き く け こ さ し す せ そ た ち つ て と 日 本 語 文 です ます",
    "fr": "ça va très bien mer ci é è ment tion que les des pour é lè ve ou vri er ê tre",
    "pl": "za żó łć gę ślą jaźń prz szcz ść ró ża dzie ń ko ta ły ką wa nie",
    "de": "stra ße ü ber schön grü ßen ung keit lich ge spräch mäd chen hau ses wei ter",
    "en": "the quick brown fox jumps o ver la zy dog ing tion er an con sid ered ly",
}
_EMOJI = ["🎉", "🚀", "👩‍💻", "🇪🇺", "🇫🇮", "😀", "🌍"]


def _lexicons(rng: np.random.Generator, words: int = 3000) -> dict[str, np.ndarray]:
    lexicons = {}
    for lang, text in _SYLLABLES.items():
        syllables = text.split()
        counts = rng.integers(1, 5, words)
        picks = rng.integers(0, len(syllables), (words, 4))
        lexicons[lang] = np.array(["".join(syllables[p] for p in picks[i, :c])
                                   for i, c in enumerate(counts)], dtype=object)
    return lexicons


def synthetic_texts(n_bytes: int, seed: int = 0) -> Iterator[str]:
    """Multilingual documents (about ``n_bytes`` of UTF-8 in all): word salad from
    syllables of nine languages, sentence punctuation, a few emoji, lognormal lengths."""
    rng = np.random.default_rng(seed)
    lexicons = _lexicons(rng)
    languages = list(lexicons)
    written = 0
    while written < n_bytes:
        lang = languages[int(rng.integers(len(languages)))]
        count = int(min(5000, max(3, rng.lognormal(math.log(150), 0.8))))
        words = lexicons[lang][rng.integers(0, len(lexicons[lang]), count)].tolist()
        cjk = lang in ("zh", "ja")
        step = int(rng.integers(6, 20))
        sentences = [("" if cjk else " ").join(words[i:i + step]) for i in
                     range(0, count, step)]
        end = "。" if cjk else ". "
        text = end.join(s[:1].upper() + s[1:] for s in sentences) + end.strip()
        if rng.random() < 0.1:
            text += " " + _EMOJI[int(rng.integers(len(_EMOJI)))]
        written += len(text.encode("utf-8"))
        yield text


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> tuple[int, int]:
    """The synthetic corpus as JSON Lines; (documents, bytes of the file)."""
    documents = 0
    with path.open("w", encoding="utf-8") as f:
        for text in synthetic_texts(n_bytes, seed):
            f.write(json.dumps({"text": text, "id": documents}, ensure_ascii=False) + "\n")
            documents += 1
    return documents, path.stat().st_size


def build_tokenizer(directory: Path, corpus: Path, vocab_size: int = TOKENIZER_VOCAB,
                    sample_bytes: int = 4 << 20) -> Path:
    """A byte-level BPE trained on the first ``sample_bytes`` of ``corpus`` (any Unicode
    encodes), ``</s>`` its end-of-document token (named in tokenizer_config.json)."""

    def texts() -> Iterator[str]:
        read = 0
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                read += len(line)
                yield json.loads(line)["text"]
                if read >= sample_bytes:
                    return

    return train_tokenizer(texts(), directory, vocab_size, EOS)


# Megatron-LM's tools/preprocess_data.py, its per-worker encoder.
_REFERENCE_WORKER: dict[str, Any] = {}


def _reference_init(tokenizer_path: str, eos_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _REFERENCE_WORKER.update(tokenizer=load_tokenizer(tokenizer_path), eos=eos_id)


def _reference_encode(line: str) -> tuple[list[int], list[int], int]:
    text = json.loads(line)["text"]
    ids = _REFERENCE_WORKER["tokenizer"].encode(text, add_special_tokens=False).ids
    if ids:
        ids.append(_REFERENCE_WORKER["eos"])
    return ids, ([len(ids)] if ids else []), len(line)


def _reference_prepare(mt: SimpleNamespace, corpus: Path, tokenizer: str, eos_id: int,
                       dtype: np.dtype, prefix: str, workers: int) -> int:
    """preprocess_data.py's loop into megatron-core's IndexedDatasetBuilder; tokens written."""
    context = multiprocessing.get_context("fork" if "fork" in
                                          multiprocessing.get_all_start_methods() else "spawn")
    builder = mt.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    tokens = 0
    with context.Pool(workers, _reference_init, (tokenizer, eos_id)) as pool, \
            corpus.open(encoding="utf-8") as lines:
        for ids, lengths, _ in pool.imap(_reference_encode, lines, 32):
            builder.add_document(ids, lengths)
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def _same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + suffix, b + suffix, shallow=False) for suffix in (".bin", ".idx"))


def run_prepare(work: Path, settings: dict[str, Any], tokenizer: str | None,
                mt: SimpleNamespace | None, reference: str, log: harness.StageLog
                ) -> list[dict[str, Any]]:
    corpus = work / "prepare" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with log.stage(f"prepare: writing a {settings['prepare_bytes'] / 2**20:.1f} MiB "
                   f"synthetic multilingual corpus"):
        documents, corpus_bytes = write_corpus(corpus, settings["prepare_bytes"])
    if tokenizer is None:
        vocab = TOKENIZER_VOCAB if settings["prepare_bytes"] >= 4 << 20 else 1000
        with log.stage(f"prepare: training a byte-level BPE tokenizer ({vocab} tokens)"):
            tokenizer = str(build_tokenizer(work / "prepare" / "tokenizer", corpus, vocab))
    info = tokenizer_info(tokenizer)
    rows = []
    for workers in PREPARE_WORKERS:
        prefix = str(work / "prepare" / f"eurocore-{workers}")
        ref_prefix = str(work / "prepare" / f"megatron-{workers}")

        def ours(workers=workers, prefix=prefix) -> dict[str, Any]:
            started = time.perf_counter()
            summary = prepare([str(corpus)], tokenizer, prefix, workers=workers,
                              progress=False)
            return _rates(summary["tokens"], time.perf_counter() - started, workers,
                          corpus_bytes)

        def theirs(workers=workers, prefix=prefix, ref_prefix=ref_prefix) -> dict[str, Any]:
            started = time.perf_counter()
            tokens = _reference_prepare(mt, corpus, tokenizer, info.eos_id,
                                        token_dtype(info.vocab_size).type, ref_prefix, workers)
            figures = _rates(tokens, time.perf_counter() - started, workers, corpus_bytes)
            if os.path.exists(prefix + ".idx"):
                figures["identical_output"] = _same_files(prefix, ref_prefix)
            return figures

        case = f"{workers} worker{'s' if workers > 1 else ''}"
        row = {"part": "prepare", "case": case, "workers": workers,
               "eurocore": _measure(ours, log, f"prepare, {case}: eurocore")}
        row["reference"] = (_measure(theirs, log, f"prepare, {case}: {reference}")
                            if mt is not None else _skipped(reference))
        row["reference"]["note"] = (
            "Megatron-LM tools/preprocess_data.py's loop re-created: Pool(workers).imap("
            "json.loads + Tokenizer.encode + EOD, chunks of 32) into megatron-core's "
            "IndexedDatasetBuilder.add_document per document, finalize")
        rows.append(row)
        for p in (prefix, ref_prefix):
            for suffix in (".bin", ".idx", ".json"):
                Path(p + suffix).unlink(missing_ok=True)
    for row in rows:
        row["corpus"] = {"documents": documents, "bytes": corpus_bytes,
                         "tokenizer": info.name, "vocab_size": info.vocab_size}
    return rows


def _rates(tokens: int, seconds: float, workers: int, corpus_bytes: int) -> dict[str, Any]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_worker": tokens / seconds / workers,
            "input_mb_per_s": corpus_bytes / seconds / 1e6}


# --- synthetic indexed datasets (index, loader) -----------------------------------------------


def document_lengths(tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal lengths (mean DOC_MEAN, at least 2) summing to exactly ``tokens``."""
    mu = math.log(DOC_MEAN) - DOC_SIGMA ** 2 / 2
    parts, total = [], 0
    while total < tokens:
        draw = np.maximum(2, rng.lognormal(mu, DOC_SIGMA, max(1024, int(
            (tokens - total) / DOC_MEAN * 1.1) + 16)).astype(np.int64))
        parts.append(draw)
        total += int(draw.sum())
    lengths = np.concatenate(parts)
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, tokens)) + 1  # the first document reaching `tokens`
    lengths = lengths[:count].copy()
    lengths[-1] -= int(ends[count - 1]) - tokens
    if lengths[-1] < 2:  # fold a 0- or 1-token tail into the previous document
        lengths[-2] += lengths[-1]
        lengths = lengths[:-1]
    return lengths


def write_synthetic(prefix: str, tokens: int, seed: int,
                    reference: tuple[SimpleNamespace, str] | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Writes the synthetic pair at ``prefix`` (eurocore's writer) and, with ``reference``
    = (megatron modules, prefix), the same documents with megatron-core's builder. Returns
    the documents and each writer's seconds (token generation excluded); ``progress`` gets
    a line every 10 s."""
    rng = np.random.default_rng(seed)
    last_report = time.perf_counter()
    lengths = document_lengths(tokens, rng)
    ends = np.cumsum(lengths)
    ours = theirs = 0.0
    writer = IndexedDatasetWriter(prefix, np.uint16)
    builder = None
    if reference is not None:
        builder = reference[0].IndexedDatasetBuilder(reference[1] + ".bin", dtype=np.uint16)
    try:
        first = 0
        while first < len(lengths):
            last = max(first + 1, int(np.searchsorted(ends, (ends[first] - lengths[first])
                                                      + CHUNK_TOKENS, side="right")))
            chunk_lengths = lengths[first:last]
            chunk_ends = np.cumsum(chunk_lengths)
            chunk = rng.integers(1, VOCAB, int(chunk_ends[-1]), dtype=np.uint16)
            chunk[chunk_ends - 1] = EOD
            started = time.perf_counter()
            writer.add_documents(chunk_lengths, chunk)
            ours += time.perf_counter() - started
            if builder is not None:
                started = time.perf_counter()
                begin = 0
                for end in chunk_ends.tolist():
                    builder.add_document(chunk[begin:end], [end - begin])
                    begin = end
                theirs += time.perf_counter() - started
            first = last
            if progress is not None and time.perf_counter() - last_report >= 10:
                last_report = time.perf_counter()
                progress(f"  {int(ends[last - 1]):,} of {tokens:,} tokens written")
        started = time.perf_counter()
        writer.finish()
        ours += time.perf_counter() - started
        if builder is not None:
            started = time.perf_counter()
            builder.finalize(reference[1] + ".idx")
            theirs += time.perf_counter() - started
    except BaseException:
        writer.abort()
        raise
    return {"documents": len(lengths), "tokens": int(ends[-1]), "seconds": ours,
            "reference_seconds": theirs if builder is not None else None}


def _remove_pair(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        Path(prefix + suffix).unlink(missing_ok=True)


# --- index build ------------------------------------------------------------------------------


def _close(source: CorpusSource) -> None:
    """Unmaps the source's datasets and drops them from eurocore.data.indexed's table of
    open maps, which would otherwise hold them (index arrays included) after the source
    is gone: builds in a row would pile up memory."""
    for dataset in source.datasets.values():
        dataset.close()


def eurocore_build(prefix: str, cache_dir: Path, rows: int) -> dict[str, Any]:
    """CorpusSource construction + global batch 0 (``rows`` rows), timed."""
    started = time.perf_counter()
    source = CorpusSource([prefix], seq_len=SEQ_LEN, batch_size=rows, cache_dir=cache_dir)
    built = time.perf_counter()
    batch = source.global_batch(0)
    done = time.perf_counter()
    IndexCache.wait()  # its cache files are written in the background: not part of the timing
    cache = source.train.sources[0].cache
    _close(source)
    return {"seconds": done - started, "construct_s": built - started,
            "first_batch_s": done - built, "cache_hits": cache.hits,
            "cache_misses": cache.misses, "rows": int(batch.tokens.shape[0])}


def megatron_build(mt: SimpleNamespace, prefix: str, cache_dir: Path,
                   rows: int) -> dict[str, Any]:
    """megatron-core's IndexedDataset + GPTDataset (one epoch) + ``rows`` items, timed."""
    from torch.utils.data import default_collate

    started = time.perf_counter()
    dataset = _megatron_dataset(mt, prefix, cache_dir, None)
    built = time.perf_counter()
    batch = default_collate([dataset[i] for i in range(rows)])
    done = time.perf_counter()
    return {"seconds": done - started, "construct_s": built - started,
            "first_batch_s": done - built, "samples": len(dataset),
            "rows": int(batch["tokens"].shape[0])}


def _repeat(build: Callable[[str, Path, int], dict[str, Any]], prefix: str, caches: Path,
            rows: int, temperature: str) -> dict[str, Any]:
    """The median of BUILD_REPEATS builds: cold, each with a fresh cache directory; warm,
    each with the one directory a first (untimed) build filled."""
    runs = []
    for run in range(BUILD_REPEATS):
        cache_dir = caches / (f"cold-{run}" if temperature == "cold" else "warm")
        if temperature == "warm" and run == 0:
            build(prefix, cache_dir, rows)
        runs.append(build(prefix, cache_dir, rows))
    runs.sort(key=lambda r: r["seconds"])
    return {**runs[len(runs) // 2], "runs_s": [r["seconds"] for r in runs]}


def run_index(work: Path, settings: dict[str, Any], mt: SimpleNamespace | None,
              reference: str, log: harness.StageLog) -> list[dict[str, Any]]:
    rows_out = []
    rows = settings["rows"]
    for tokens in settings["sizes"]:
        label = _tokens_label(tokens)
        directory = work / f"index-{label}"
        directory.mkdir(parents=True, exist_ok=True)
        prefix, ref_prefix = str(directory / "synthetic"), str(directory / "megatron-copy")
        with log.stage(f"index {label}: writing the synthetic .bin/.idx ({2 * tokens / 1e9:.2f}"
                       f" GB{', and megatron-core copy' if mt is not None else ''})"):
            written = write_synthetic(prefix, tokens, seed=1,
                                      reference=(mt, ref_prefix) if mt is not None else None,
                                      progress=log)
        identical = None
        if mt is not None:
            with log.stage(f"index {label}: comparing the two writers' files"):
                identical = _same_files(prefix, ref_prefix)
            _remove_pair(ref_prefix)
        common = {"part": "index", "tokens": written["tokens"],
                  "documents": written["documents"]}
        ours = {"status": "ok", "seconds": written["seconds"],
                "tokens_per_s": written["tokens"] / written["seconds"]}
        theirs = (_skipped(reference) if mt is None else
                  {"status": "ok", "seconds": written["reference_seconds"],
                   "tokens_per_s": written["tokens"] / written["reference_seconds"],
                   "identical_output": identical})
        theirs["note"] = "IndexedDatasetBuilder.add_document per document + finalize"
        rows_out.append({**common, "case": f"write {label} tokens", "stage": "write",
                         "eurocore": ours, "reference": theirs})
        for temperature in ("cold", "warm"):
            row = {**common, "case": f"build {label}, {temperature} cache", "stage": "build",
                   "cache": temperature, "rows": rows}
            row["eurocore"] = _measure(
                partial(_repeat, eurocore_build, prefix, directory / "eurocore", rows,
                        temperature), log,
                f"index {label}: eurocore build, {temperature} cache, {BUILD_REPEATS} runs")
            row["eurocore"]["note"] = (f"CorpusSource(seq_len={SEQ_LEN}, batch_size={rows}) "
                                       f"+ global_batch(0)")
            row["reference"] = (_skipped(reference) if mt is None else _measure(
                partial(_repeat, partial(megatron_build, mt), prefix, directory / "megatron",
                        rows, temperature), log,
                f"index {label}: {reference} build, {temperature} cache, {BUILD_REPEATS} runs"))
            row["reference"]["note"] = (f"IndexedDataset + GPTDataset(one epoch; document, "
                                        f"sample and shuffle indices via helpers_cpp) + "
                                        f"{rows} x __getitem__ + default_collate")
            rows_out.append(row)
        shutil.rmtree(directory, ignore_errors=True)
    return rows_out


# --- loader -----------------------------------------------------------------------------------


def _timed_steps(batches: Iterator[Any], tokens_per_step: int) -> dict[str, Any]:
    """Consumes ``batches``; throughput counted after the first one arrives."""
    started = time.perf_counter()
    first_at, steps = None, 0
    for _ in batches:
        steps += 1
        if first_at is None:
            first_at = time.perf_counter()
    done = time.perf_counter()
    if first_at is None:
        raise RuntimeError("no batch came")
    steady = max(done - first_at, 1e-9)
    counted = (steps - 1) * tokens_per_step
    return {"steps": steps, "tokens_counted": counted, "seconds": steady,
            "first_batch_s": first_at - started, "total_s": done - started,
            "tokens_per_s": counted / steady}


def eurocore_loader(prefix: str, cache_dir: Path, rows: int, steps: int,
                    workers: int) -> dict[str, Any]:
    source = CorpusSource([prefix], seq_len=SEQ_LEN, batch_size=rows * RANKS,
                          cache_dir=cache_dir)
    source.global_batch(0, slice(0, rows))  # epoch 0 built before timing, as Megatron's
    batches = prefetch(source, slice(0, rows), start=0, stop=steps, workers=workers,
                       pin=torch.cuda.is_available())
    figures = _timed_steps(batches, rows * SEQ_LEN)
    _close(source)
    return figures


def megatron_loader(mt: SimpleNamespace, prefix: str, cache_dir: Path, rows: int,
                    steps: int, workers: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader, default_collate

    dataset = _megatron_dataset(mt, prefix, cache_dir, steps * rows * RANKS)
    indices = [[step * rows * RANKS + r for r in range(rows)] for step in range(steps)]
    if workers == 0:
        batches = (default_collate([dataset[i] for i in step]) for step in indices)
    else:
        batches = iter(DataLoader(dataset, batch_sampler=indices, num_workers=workers,
                                  pin_memory=torch.cuda.is_available()))
    return _timed_steps(batches, rows * SEQ_LEN)


def run_loader(work: Path, settings: dict[str, Any], mt: SimpleNamespace | None,
               reference: str, log: harness.StageLog) -> list[dict[str, Any]]:
    rows, steps, tokens = settings["rows"], settings["steps"], settings["loader_tokens"]
    directory = work / "loader"
    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / "synthetic")
    with log.stage(f"loader: writing a synthetic {_tokens_label(tokens)}-token .bin/.idx"):
        write_synthetic(prefix, tokens, seed=2)
    out = []
    for workers in LOADER_WORKERS:
        case = f"{workers} workers"
        row = {"part": "loader", "case": case, "workers": workers, "rows": rows,
               "steps": steps, "seq_len": SEQ_LEN, "dataset_tokens": tokens,
               "goal_tokens_per_s": GOAL_LOADER_TOKENS_PER_S}
        row["eurocore"] = _measure(
            lambda workers=workers: eurocore_loader(prefix, directory / "cache-eurocore", rows,
                                                    steps, workers),
            log, f"loader, {case}: eurocore prefetch, {steps} steps of {rows} rows")
        row["reference"] = (_skipped(reference) if mt is None else _measure(
            lambda workers=workers: megatron_loader(mt, prefix, directory / "cache-megatron",
                                                    rows, steps, workers),
            log, f"loader, {case}: {reference} GPTDataset, {steps} steps of {rows} rows"))
        row["reference"]["note"] = ("GPTDataset.__getitem__ (reset_position_ids, "
                                    "eod_mask_loss) + default_collate"
                                    + (f"; DataLoader(batch_sampler, num_workers={workers})"
                                       if workers else ""))
        out.append(row)
    shutil.rmtree(directory, ignore_errors=True)
    return out


# --- goals and the table ----------------------------------------------------------------------


def judge(row: dict[str, Any]) -> None:
    """Sets the row's ``speedup`` (eurocore's speed over the reference's: > 1 faster),
    ``goal`` and ``goal_met`` (None where it cannot be said)."""
    ours, theirs = row["eurocore"], row["reference"]
    both = ours.get("status") == "ok" and theirs.get("status") == "ok"
    row["speedup"] = None
    if both:
        if row["part"] == "index" and row["stage"] == "build":
            row["speedup"] = theirs["seconds"] / max(ours["seconds"], 1e-12)
        else:
            row["speedup"] = ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-12)
    row["goal"], row["goal_met"] = None, None
    if row["part"] == "loader":
        row["goal"] = f">= {GOAL_LOADER_TOKENS_PER_S:,} tokens/s per rank"
        if ours.get("status") == "ok":
            row["goal_met"] = ours["tokens_per_s"] >= GOAL_LOADER_TOKENS_PER_S
    elif row["part"] == "index" and row["stage"] == "build":
        row["goal"] = "no slower than megatron-core"
        if both:
            row["goal_met"] = ours["seconds"] <= theirs["seconds"]


def _figure(row: dict[str, Any], side: dict[str, Any]) -> str:
    if side.get("status") != "ok":
        return side.get("status", "?")
    if row["part"] == "prepare":
        return f"{side['tokens_per_s_per_worker']:,.0f} tok/s/worker"
    if row["part"] == "index" and row["stage"] == "build":
        return f"{side['seconds']:.3f} s"
    if row["part"] == "index":
        return f"{side['tokens_per_s'] / 1e6:,.1f} M tok/s"
    return f"{side['tokens_per_s']:,.0f} tok/s/rank"


def format_table(rows: Sequence[dict[str, Any]], env: dict[str, Any], reference: str) -> str:
    columns = ("part", "case", "eurocore", reference.split(" (")[0], "speed vs ref", "goal")
    lines_rows = []
    for row in rows:
        goal = "-"
        if row.get("goal"):
            verdict = {True: "met", False: "NOT met", None: "?"}[row["goal_met"]]
            goal = f"{row['goal']}: {verdict}"
        lines_rows.append((row["part"], row["case"], _figure(row, row["eurocore"]),
                           _figure(row, row["reference"]),
                           "-" if row["speedup"] is None else f"{row['speedup']:.2f}x", goal))
    widths = [max([len(c)] + [len(r[i]) for r in lines_rows]) for i, c in enumerate(columns)]
    right = {2, 3, 4}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = []
    if env.get("is_cpu"):
        out.append(f"*** CPU FIGURES - measured on a machine without a GPU "
                   f"({env.get('cpu_count')} CPU cores: {env.get('cpu_model')}); the data "
                   f"pipeline runs on the host CPU, but not this host's ***")
    out += [line(columns), "  ".join("-" * w for w in widths)]
    previous = None
    for row, cells in zip(rows, lines_rows, strict=True):
        if previous is not None and row["part"] != previous:
            out.append("")
        previous = row["part"]
        out.append(line(cells))
    out.append("speed vs ref: eurocore's speed over the reference's (> 1: eurocore faster). "
               "prepare: tokens/s per worker; write: tokens/s; build: seconds (construction "
               "+ first batch); loader: tokens/s per rank after the first step.")
    for row in rows:
        for side in ("eurocore", "reference"):
            if row[side].get("status") in ("failed", "unavailable"):
                out.append(f"{row[side]['status']}: {row['part']} {row['case']} {side}: "
                           f"{row[side]['reason']}")
            if row[side].get("identical_output") is False:
                out.append(f"note: {row['part']} {row['case']}: the two outputs DIFFER")
    return "\n".join(out)


# --- the command --------------------------------------------------------------------------------


def format_environment(env: dict[str, Any], reference: str) -> str:
    """The host, the software and the command, as harness.format_environment (the data
    pipeline's work is the host's, so the host leads)."""
    device = env["device_name"] + ("" if env["is_cpu"] else
                                   f" ({env.get('gpu_arch')}, {env.get('gpu_memory_gib')} GiB)")
    return (f"host:      {env['cpu_count']} CPU cores, {env['cpu_model']}; device: {device}"
            + ("  <- CPU FIGURES: no GPU here" if env["is_cpu"] else "") + "\n"
            f"software:  torch {env['torch']}, eurocore {env['eurocore']}, python "
            f"{env['python']}; reference: {reference}\n"
            f"run:       {env['time_utc']} on {env['hostname']}: {env['command']}")


METHOD = {
    "prepare": "eurocore.data.prepare.prepare on a synthetic multilingual JSONL corpus, "
               "1 and 2 workers; whole call timed; tokens written (EOD included) counted",
    "index_write": "IndexedDatasetWriter.add_documents (16 Mi-token chunks) + finish; token "
                   "generation excluded",
    "index_build": "CorpusSource([prefix], seq_len=4096, batch_size=rows, cache_dir) + "
                   "global_batch(0); cold: fresh cache directory, warm: filled",
    "loader": "prefetch(source, slice(0, rows), workers=0|2): rank 0 of 8; tokens = rows x "
              "4096 per step after the first step, over the time since it arrived",
    "reference": "megatron-core: preprocess_data.py's loop over IndexedDatasetBuilder; "
                 "IndexedDatasetBuilder.add_document; IndexedDataset + GPTDataset (one epoch) "
                 "+ __getitem__; GPTDataset.__getitem__ loop / DataLoader",
}


def _parse_sizes(parser: argparse.ArgumentParser, items: list[str], minimum: int) -> list[int]:
    sizes = []
    for item in items:
        for text in item.split(","):
            try:
                value = float(text)
            except ValueError:
                parser.error(f"--sizes: expected token counts like 1e8, got {text!r}")
            if not math.isfinite(value) or value != int(value) or value < minimum:
                parser.error(f"--sizes: each a whole number of tokens >= {minimum:,} "
                             f"(--rows x {SEQ_LEN} + 1), got {text!r}")
            sizes.append(int(value))
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks.data",
        description="Times the data pipeline (prepare, index build, loader) beside "
                    "megatron-core doing the same work, where it is installed.")
    parser.add_argument("--parts", nargs="+", default=None, metavar="PART",
                        help=f"parts to run, space- or comma-separated (default: all of "
                             f"{', '.join(PARTS)})")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="TOKENS",
                        help="token counts of the index-build datasets (default 1e8 1e9; "
                             "--quick: 2e5 1e6)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: seconds in all (tests the benchmark, not the code)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of seq_len 4096 per rank and step (default 8; --quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="loader steps timed (default 1000; --quick 4)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="the prepare part's tokenizer (a tokenizer.json or a directory "
                             "holding one; default: a byte-level BPE trained on the spot)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON goes (default: {DEFAULT_OUT})")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where the synthetic files go, in a fresh sub-directory "
                             "removed at the end (default: the system's temporary directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the synthetic files (the run's sub-directory of --workdir)")
    return parser


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else DEFAULTS
    settings = dict(base)
    for option, name, minimum in (("--rows", "rows", 1), ("--steps", "steps", 2)):
        value = getattr(args, name)
        if value is not None:
            if value < minimum:
                parser.error(f"{option}: expected an int >= {minimum}, got {value}")
            settings[name] = value
    minimum = settings["rows"] * SEQ_LEN + 1
    settings["sizes"] = (_parse_sizes(parser, args.sizes, minimum) if args.sizes is not None
                         else list(base["sizes"]))
    if args.parts is None:
        settings["parts"] = list(PARTS)
    else:
        names = [n for item in args.parts for n in item.split(",") if n]
        unknown = [n for n in names if n not in PARTS]
        if unknown or not names:
            parser.error(f"--parts: unknown {', '.join(map(repr, unknown)) or 'nothing'}; "
                         f"expected some of {', '.join(PARTS)}")
        settings["parts"] = [p for p in PARTS if p in names]
    settings["loader_tokens"] = max(settings["loader_tokens"], 4 * minimum)
    return settings


def _disk_needed(settings: dict[str, Any], with_reference: bool) -> int:
    """Bytes the run keeps at once, at most (uint16 tokens, both writers' copies)."""
    need = 0
    if "index" in settings["parts"] and settings["sizes"]:
        need = max(need, 2 * max(settings["sizes"]) * (2 if with_reference else 1))
    if "loader" in settings["parts"]:
        need = max(need, 2 * settings["loader_tokens"])
    if "prepare" in settings["parts"]:
        need = max(need, 3 * settings["prepare_bytes"])
    return int(need * 1.05) + (64 << 20)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the chosen parts, prints the table and writes the JSON after each part; exit
    status 1 when a eurocore measurement failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(parser, args)
    try:
        check_writable_dir("--out", args.out)
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        check_writable_dir("--workdir", base)
        if args.tokenizer is not None and "prepare" in settings["parts"]:
            tokenizer_info(args.tokenizer)
    except ValueError as err:
        message = str(err)
        if message.startswith(("tokenizer:", "eos_token:")):
            message = "--tokenizer: " + message.split(":", 1)[1].strip()
        parser.error(message)
    mt, reference = load_megatron()
    base.mkdir(parents=True, exist_ok=True)
    need, free = _disk_needed(settings, mt is not None), shutil.disk_usage(base).free
    if need > free:
        parser.error(f"--workdir: the run needs about {need / 1e9:.1f} GB free under "
                     f"{str(base)!r}, which has {free / 1e9:.1f} GB")

    env = harness.environment()
    env["cpu_model"] = harness._cpu_model()
    env["cpu_count"] = os.cpu_count()
    print(format_environment(env, reference), flush=True)
    path = harness.result_path(env, args.out, "data")
    work = Path(tempfile.mkdtemp(prefix="eurocore-databench-", dir=base))
    log = harness.StageLog()
    log(f"synthetic files under {work}" + (" (kept)" if args.keep else ""))
    rows: list[dict[str, Any]] = []
    payload = {
        "benchmark": "data", "schema": SCHEMA_VERSION, "environment": env,
        "reference": reference,
        "settings": {**settings, "seq_len": SEQ_LEN, "ranks": RANKS,
                     "tokenizer": args.tokenizer, "prepare_workers": list(PREPARE_WORKERS),
                     "loader_workers": list(LOADER_WORKERS), "doc_mean_tokens": DOC_MEAN,
                     "doc_sigma": DOC_SIGMA},
        "method": METHOD,
        "goals": {"loader_tokens_per_s_per_rank": GOAL_LOADER_TOKENS_PER_S,
                  "index_build": "no slower than megatron-core"},
        "parts": {},
    }
    runners = {"prepare": lambda: run_prepare(work, settings, args.tokenizer, mt, reference,
                                              log),
               "index": lambda: run_index(work, settings, mt, reference, log),
               "loader": lambda: run_loader(work, settings, mt, reference, log)}
    try:
        for part in settings["parts"]:
            part_rows = runners[part]()
            for row in part_rows:
                judge(row)
            rows += part_rows
            payload["parts"][part] = part_rows
            payload["seconds"] = time.perf_counter() - log.start
            payload["peak_rss_mib"] = harness.peak_rss_mib()
            write_json_atomically(payload, path)  # after each part: a cut-short run keeps it
            log(f"{part}: results written to {path}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(rows, env, reference))
    print(f"\nresults written to {path} ({time.perf_counter() - log.start:.1f} s in all)")
    failed = any(r["eurocore"].get("status") == "failed" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
