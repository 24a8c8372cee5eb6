"""``eurocore data prepare``: every input format round-trips multilingual text token for
token (blank documents skipped and counted), the output is Megatron's indexed format both
ways (megatron-core reads ours, we read megatron-core's and a fixture written byte by byte),
the worker count changes nothing, bad inputs stop the CLI with exit status 2 and one line
naming the file and line (or row) and leave nothing behind, and the progress line and
``--add-special-tokens`` do what they say."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from eurocore.data import indexed
from eurocore.data import prepare as prepare_module
from eurocore.data.__main__ import main
from eurocore.data.indexed import IndexedDataset, IndexedDatasetWriter
from eurocore.data.prepare import prepare
from tests.data.corpora import EOS, TEXTS, documents, make_tokenizer, write_jsonl

PROG = "python -m eurocore.data prepare"
# TEXTS and sentences drawn from it: every script, blank documents, a newline inside one.
CORPUS = TEXTS + documents(40, seed=1)
ASCII_LINES = [f"document {i}: " + "lorem ipsum dolor " * (i % 9) for i in range(6000)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def _expected(tokenizer, texts) -> list[list[int]]:
    """What prepare must write for ``texts``: each non-blank one encoded without special
    tokens, then the EOS id."""
    eos = tokenizer.token_to_id(EOS)
    return [[*tokenizer.encode(t, add_special_tokens=False).ids, eos]
            for t in texts if t and t.strip()]


def _blanks(texts) -> int:
    return sum(1 for t in texts if not (t and t.strip()))


def _read_back(prefix) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset.document(i).tolist() for i in range(dataset.num_documents)]


def _compress(path: Path, suffix: str) -> Path:
    out = path.with_name(path.name + suffix)
    if suffix == ".gz":
        out.write_bytes(gzip.compress(path.read_bytes()))
    else:
        import zstandard

        out.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    path.unlink()
    return out


def _write_parquet(path: Path, columns: dict, row_group_size: int = 7) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return path


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _listing(directory: Path) -> list[str]:
    """Every entry, hidden ones (temporary files) included."""
    return sorted(os.listdir(directory))


# --- round trips ---------------------------------------------------------------------------


def _jsonl_inputs(tmp_path, suffix=""):
    path = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    return [_compress(path, suffix) if suffix else path], CORPUS, {}


def _parquet_inputs(tmp_path):
    texts = [*CORPUS, None]  # a null cell is an empty document
    path = _write_parquet(tmp_path / "corpus.parquet",
                          {"id": list(range(len(texts))), "text": texts})
    return [path], texts, {}


def _text_file_inputs(tmp_path):
    paths = []
    for i, text in enumerate(CORPUS):  # one document per file, the newline inside kept
        paths.append(tmp_path / "files" / f"doc{i:03d}.txt")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(text.encode("utf-8"))
    return paths, CORPUS, {}


def _text_line_inputs(tmp_path):
    lines = [line for text in CORPUS for line in text.split("\n")]
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return [path], lines, {"line_docs": True}


@pytest.mark.parametrize("make_inputs", [
    pytest.param(_jsonl_inputs, id="jsonl"),
    pytest.param(lambda tmp: _jsonl_inputs(tmp, ".gz"), id="jsonl.gz"),
    pytest.param(lambda tmp: _jsonl_inputs(tmp, ".zst"), id="jsonl.zst"),
    pytest.param(_parquet_inputs, id="parquet"),
    pytest.param(_text_file_inputs, id="text-per-file"),
    pytest.param(_text_line_inputs, id="text-line-docs"),
])
def test_round_trip_of_multilingual_text(tmp_path, tokenizer_dir, tokenizer, make_inputs):
    """Each non-blank document comes back as its encoding plus EOS, in order; blank ones are
    skipped and counted; the summary describes the files written."""
    inputs, texts, options = make_inputs(tmp_path)
    prefix = tmp_path / "out" / "corpus"
    summary = prepare([str(p) for p in inputs], str(tokenizer_dir), str(prefix),
                      progress=False, **options)

    expected = _expected(tokenizer, texts)
    assert _blanks(texts) >= 2 and len(expected) > 40
    assert _read_back(prefix) == expected
    assert IndexedDataset(prefix).dtype == np.uint16

    tokens = sum(map(len, expected))
    assert summary["documents"] == len(expected)
    assert summary["empty_documents_skipped"] == _blanks(texts)
    assert summary["tokens"] == tokens
    assert summary["max_token_id"] == max(max(ids) for ids in expected)
    assert summary["dtype"] == "uint16"
    assert summary["bin_bytes"] == 2 * tokens == os.path.getsize(f"{prefix}.bin")
    file_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert summary["tokenizer"]["sha256"] == file_hash
    assert summary["tokenizer"]["eos_id"] == tokenizer.token_to_id(EOS)
    assert summary["tokenizer"]["eos_token"] == EOS
    assert summary["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size(True) == 500
    assert summary["inputs"] == [{"path": str(p), "bytes": p.stat().st_size} for p in inputs]
    assert summary["line_docs"] is bool(options.get("line_docs"))
    assert json.loads(Path(f"{prefix}.json").read_text()) == summary
    assert _listing(prefix.parent) == ["corpus.bin", "corpus.idx", "corpus.json"]


def test_jsonl_blank_lines_are_not_documents_and_line_numbers_stay_physical(
        tmp_path, tokenizer_dir, tokenizer):
    """Blank physical lines of a JSON Lines file are neither documents nor counted, and
    errors after them still name the file's own line number."""
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "eins"}\n\n   \n{"text": "zwei"}\n')
    summary = prepare([str(path)], str(tokenizer_dir), str(tmp_path / "gaps"), progress=False)
    assert _read_back(tmp_path / "gaps") == _expected(tokenizer, ["eins", "zwei"])
    assert summary["empty_documents_skipped"] == 0
    path.write_text('{"text": "eins"}\n\n\n{"text": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 4: 'text' is a int"):
        prepare([str(path)], str(tokenizer_dir), str(tmp_path / "gaps2"), progress=False)


# --- Megatron compatibility ---------------------------------------------------------------


def _megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_core_reads_our_output(tmp_path, tokenizer_dir, tokenizer):
    """megatron-core's IndexedDataset sees the same sequences, token for token, with one
    sequence per document and the uint16 dtype."""
    megatron = _megatron()
    source = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    prefix = str(tmp_path / "corpus")
    prepare([str(source)], str(tokenizer_dir), prefix, progress=False)
    theirs = megatron.IndexedDataset(prefix)
    expected = _expected(tokenizer, CORPUS)
    assert len(theirs) == len(expected)
    assert theirs.index.dtype == np.uint16
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(expected) + 1))
    np.testing.assert_array_equal(theirs.sequence_lengths, list(map(len, expected)))
    # a slice through megatron's get() lands on the same tokens
    np.testing.assert_array_equal(theirs.get(3, offset=1, length=2), expected[3][1:3])


def test_dtype_codes_are_megatrons():
    """Every dtype code means what it means to megatron-core."""
    megatron = _megatron()
    theirs = {member.value: np.dtype(member.name) for member in megatron.DType}
    assert theirs == indexed.DTYPE_CODES


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_cores_builder_output(tmp_path, dtype):
    """A dataset written by megatron-core's IndexedDatasetBuilder, documents of one and of
    several sequences: our reader's sequences, documents and arrays match."""
    megatron = _megatron()
    import torch

    high = 70_000 if dtype == np.int32 else 60_000  # int32 holds ids beyond uint16
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, high, n) for n in lengths]
            for lengths in ([5], [3, 4], [1], [2, 7, 1], [6])]
    prefix = str(tmp_path / "megatron")
    builder = megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for sequences in docs:
        for sequence in sequences:
            builder.add_item(torch.from_numpy(sequence))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    ours = IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype)
    assert ours.num_documents == len(docs) and ours.num_sequences == 8
    flat = [s for sequences in docs for s in sequences]
    for i, sequence in enumerate(flat):
        np.testing.assert_array_equal(ours.sequence(i), sequence)
    for i, sequences in enumerate(docs):
        np.testing.assert_array_equal(ours.document(i), np.concatenate(sequences))
    np.testing.assert_array_equal(ours.document_indices, [0, 1, 3, 4, 7, 8])
    assert ours.num_tokens == sum(map(len, flat))
    assert ours.max_token() == max(int(s.max()) for s in flat)


# Written by hand from the layout in eurocore.data.indexed's docstring: documents of one,
# two (sentence-split) and one sequence, and an empty one (two equal boundaries).
HAND_SEQUENCES = [[5, 6, 7], [8, 9], [10], [11, 65_535]]
HAND_DOCUMENTS = [0, 1, 3, 3, 4]


def _write_by_hand(prefix: Path, code: int, dtype) -> None:
    lengths = [len(s) for s in HAND_SEQUENCES]
    itemsize = np.dtype(dtype).itemsize
    pointers = [itemsize * sum(lengths[:i]) for i in range(len(lengths))]
    S, D1 = len(lengths), len(HAND_DOCUMENTS)
    Path(f"{prefix}.bin").write_bytes(b"".join(
        struct.pack(f"<{len(s)}{'H' if itemsize == 2 else 'i'}", *s) for s in HAND_SEQUENCES))
    Path(f"{prefix}.idx").write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
        + struct.pack("<Q", S) + struct.pack("<Q", D1)
        + struct.pack(f"<{S}i", *lengths) + struct.pack(f"<{S}q", *pointers)
        + struct.pack(f"<{D1}q", *HAND_DOCUMENTS))


@pytest.mark.parametrize("code, dtype", [(8, np.uint16), (4, np.int32)])
def test_we_read_a_fixture_written_byte_by_byte(tmp_path, code, dtype):
    """Header, dtype code, lengths, pointers and document boundaries as documented; a
    two-sequence document reads as their concatenation, an empty one as nothing."""
    prefix = tmp_path / "hand"
    _write_by_hand(prefix, code, dtype)
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype)
    assert ours.num_sequences == 4 and ours.num_documents == 4 and ours.num_tokens == 8
    np.testing.assert_array_equal(ours.sequence_lengths, [3, 2, 1, 2])
    itemsize = np.dtype(dtype).itemsize
    np.testing.assert_array_equal(ours.sequence_pointers, np.array([0, 3, 5, 6]) * itemsize)
    np.testing.assert_array_equal(ours.document_indices, HAND_DOCUMENTS)
    assert [ours.sequence(i).tolist() for i in range(4)] == HAND_SEQUENCES
    assert [ours.document(i).tolist() for i in range(4)] == [
        [5, 6, 7], [8, 9, 10], [], [11, 65_535]]
    assert ours.max_token() == 65_535


def test_megatron_core_reads_the_hand_written_fixture_the_same(tmp_path):
    """The byte-by-byte fixture is Megatron's format indeed: megatron-core agrees."""
    megatron = _megatron()
    prefix = tmp_path / "hand"
    _write_by_hand(prefix, 8, np.uint16)
    theirs = megatron.IndexedDataset(str(prefix))
    assert [theirs[i].tolist() for i in range(len(theirs))] == HAND_SEQUENCES
    np.testing.assert_array_equal(theirs.document_indices, HAND_DOCUMENTS)


def test_our_writer_matches_megatron_cores_builder_byte_for_byte(tmp_path):
    """One sequence per document: IndexedDatasetWriter's files equal the builder's."""
    megatron = _megatron()
    import torch

    docs = [np.array(d, np.int32) for d in ([1, 2, 3], [70_000], [4, 5], [6])]
    with IndexedDatasetWriter(tmp_path / "ours", np.int32) as writer:
        for doc in docs:
            writer.add_document(doc)
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        ours_bytes = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours_bytes == (tmp_path / f"theirs{suffix}").read_bytes(), suffix


# --- determinism ---------------------------------------------------------------------------


def test_worker_count_changes_nothing(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    """1 or 3 worker processes, many small tasks: byte-identical .bin and .idx."""
    monkeypatch.setattr(prepare_module, "TASK_DOCUMENTS", 16)
    texts = documents(300, seed=7)
    sources = [write_jsonl(tmp_path / f"part{i}.jsonl", texts[i::2]) for i in range(2)]
    summaries = {}
    for workers in (1, 3):
        summaries[workers] = prepare([str(s) for s in sources], str(tokenizer_dir),
                                     str(tmp_path / f"w{workers}"), workers=workers,
                                     progress=False)
    for suffix in (".bin", ".idx"):
        assert ((tmp_path / f"w1{suffix}").read_bytes()
                == (tmp_path / f"w3{suffix}").read_bytes()), suffix
    assert summaries[1]["tokens"] == summaries[3]["tokens"] > 0
    assert _read_back(tmp_path / "w3") == _expected(tokenizer, texts[0::2] + texts[1::2])


# --- bad inputs ---------------------------------------------------------------------------


def _missing_file(tmp):
    return ["--input", tmp / "nope.jsonl"], [r"input: '.*nope\.jsonl' is not a readable file"]


def _directory_as_input(tmp):
    (tmp / "adir.jsonl").mkdir()
    return ["--input", tmp / "adir.jsonl"], [r"'.*adir\.jsonl' is not a readable file"]


def _invalid_json_at_line_3(tmp):
    good = write_jsonl(tmp / "good.jsonl", ["fine", "also fine", "still fine"])
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n{"text": "d"}\n')
    return ["--input", good, bad], [rf"input: {bad}: line 3: invalid JSON"]


def _missing_text_key(tmp):
    path = tmp / "body.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b", "id": 2}\n')
    return ["--input", path], [rf"{path}: line 2: no 'text' key \(found 'body', 'id'\); "
                               r"see --text-key"]


def _non_string_text(tmp):
    path = tmp / "number.jsonl"
    path.write_text('{"text": "a"}\n{"text": ["not", "a", "string"]}\n')
    return ["--input", path], [rf"{path}: line 2: 'text' is a list, not a string"]


def _not_utf8(tmp):
    path = tmp / "latin1.txt"
    path.write_bytes("ok\nPäivää\n".encode("latin-1"))
    return ["--input", path, "--line-docs"], [rf"{path}: line 2: not UTF-8 text"]


def _empty_corpus(tmp):
    path = write_jsonl(tmp / "blank.jsonl", ["", "   ", "\n\t"])
    return ["--input", path], [r"input: no documents in 1 file\(s\) \(3 empty or blank"]


def _tokenizer_without_json(tmp):
    (tmp / "emptytok").mkdir()
    path = write_jsonl(tmp / "c.jsonl", ["text"])
    return (["--input", path, "--tokenizer", tmp / "emptytok"],
            [rf"tokenizer: '{tmp / 'emptytok'}' is neither a tokenizer\.json"])


def _unknown_eos(tmp):
    path = write_jsonl(tmp / "c.jsonl", ["text"])
    return (["--input", path, "--eos-token", "<|no-such-token|>"],
            [r"eos_token: .*tokenizer\.json' has no end-of-document token among "
             r"\['<\|no-such-token\|>'\]; name it with --eos-token"])


def _not_gzip(tmp):
    path = tmp / "c.jsonl.gz"
    path.write_bytes(b'{"text": "plain, not gzip"}\n')
    return ["--input", path], [rf"input: cannot read '{path}' \(Not a gzipped file"]


def _truncated_gzip(tmp):
    data = gzip.compress("\n".join(ASCII_LINES).encode())
    path = tmp / "c.txt.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    return ["--input", path, "--line-docs"], [rf"input: cannot read '{path}' \(Compressed "
                                              r"file ended"]


def _corrupt_gzip_body(tmp):
    data = bytearray(gzip.compress(json.dumps({"text": "x" * 5000}).encode()))
    data[12:20] = b"\xff" * 8  # the deflate stream right after the 10-byte header
    path = tmp / "c.jsonl.gz"
    path.write_bytes(bytes(data))
    return ["--input", path], [rf"input: cannot read '{path}'"]


def _not_zstd(tmp):
    path = tmp / "c.jsonl.zst"
    path.write_bytes(b"this is not zstandard data at all\n" * 4)
    return ["--input", path], [rf"input: cannot read '{path}' \(zstd: "]


def _truncated_zstd(tmp):
    import zstandard

    data = zstandard.ZstdCompressor().compress("\n".join(ASCII_LINES).encode())
    path = tmp / "c.txt.zst"
    path.write_bytes(data[: len(data) * 2 // 3])
    return ["--input", path, "--line-docs"], [rf"input: cannot read '{path}'"]


def _parquet_without_column(tmp):
    path = _write_parquet(tmp / "c.parquet", {"body": ["a", "b"], "id": [1, 2]})
    return ["--input", path], [rf"input: '{path}' has no column 'text' \(columns: body, id\); "
                               r"see --text-key"]


def _parquet_non_string(tmp):
    path = _write_parquet(tmp / "c.parquet", {"text": [None, 2, 3]})  # row 1 is null
    return ["--input", path], [rf"input: {path}: row 2: 'text' is a int, not a string"]


def _output_under_a_file(tmp):
    path = write_jsonl(tmp / "c.jsonl", ["text"])
    (tmp / "out" / "afile").write_text("I am a file")
    return (["--input", path, "--output-prefix", tmp / "out" / "afile" / "sub" / "corpus"],
            [rf"output_prefix: cannot write under '{tmp / 'out' / 'afile' / 'sub'}': "
             rf"'{tmp / 'out' / 'afile'}' is not a directory"])


@pytest.mark.parametrize("make_case", [
    pytest.param(_missing_file, id="missing-input"),
    pytest.param(_directory_as_input, id="directory-input"),
    pytest.param(_invalid_json_at_line_3, id="invalid-json-line-3"),
    pytest.param(_missing_text_key, id="missing-text-key"),
    pytest.param(_non_string_text, id="non-string-text"),
    pytest.param(_not_utf8, id="not-utf8"),
    pytest.param(_empty_corpus, id="empty-corpus"),
    pytest.param(_tokenizer_without_json, id="tokenizer-without-json"),
    pytest.param(_unknown_eos, id="unknown-eos"),
    pytest.param(_not_gzip, id="not-gzip"),
    pytest.param(_truncated_gzip, id="truncated-gzip"),
    pytest.param(_corrupt_gzip_body, id="corrupt-gzip-body"),
    pytest.param(_not_zstd, id="not-zstd"),
    pytest.param(_truncated_zstd, id="truncated-zstd"),
    pytest.param(_parquet_without_column, id="parquet-without-column"),
    pytest.param(_parquet_non_string, id="parquet-non-string"),
    pytest.param(_output_under_a_file, id="output-dir-cannot-be-created"),
])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, tokenizer_dir, capsys, make_case):
    """Exit status 2, one ``error:`` line naming the file and line (or row, or option), and
    no .bin/.idx/.json or temporary file in the output directory."""
    out = tmp_path / "out"
    out.mkdir()
    args, patterns = make_case(tmp_path)
    if "--tokenizer" not in args:
        args += ["--tokenizer", tokenizer_dir]
    if "--output-prefix" not in args:
        args += ["--output-prefix", out / "corpus"]
    before = _listing(out)
    code, stdout, stderr = _cli(capsys, *args)
    assert code == 2, stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith(f"{PROG}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    # anything else is the progress line (the empty corpus prints its final one)
    assert all(line.startswith("prepare: ") for line in lines[:-1]), stderr
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    assert stdout == ""
    assert _listing(out) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_an_unreadable_input_is_named(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "secret.jsonl", ["text"])
    path.chmod(0)
    code, _, stderr = _cli(capsys, "--input", path, "--tokenizer", tokenizer_dir,
                           "--output-prefix", tmp_path / "out" / "c")
    assert code == 2 and f"'{path}' is not a readable file" in stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_directories_it_created(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    code, _, stderr = _cli(capsys, "--input", bad, "--tokenizer", tokenizer_dir, "--quiet",
                           "--output-prefix", tmp_path / "new" / "deeper" / "corpus")
    assert code == 2 and "line 2: invalid JSON" in stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("prefix", ["outdir/", "outdir"])
def test_an_output_prefix_naming_a_directory_is_refused(tmp_path, tokenizer_dir, capsys,
                                                         prefix):
    """A prefix with a trailing slash, or an existing directory, names no dataset (it used
    to write outdir.bin beside the directory)."""
    (tmp_path / "outdir").mkdir()
    src = write_jsonl(tmp_path / "a.jsonl", ["some text"])
    code, _, stderr = _cli(capsys, "--input", src, "--tokenizer", tokenizer_dir, "--quiet",
                           "--output-prefix", f"{tmp_path}/{prefix}")
    assert code == 2 and "output_prefix: " in stderr and "names a directory" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "outdir"]
    assert not list((tmp_path / "outdir").iterdir())


def test_a_null_text_is_an_empty_document(tmp_path, tokenizer_dir):
    """JSON null, like a null Parquet cell, is a document with no text: skipped, counted."""
    src = tmp_path / "n.jsonl"
    src.write_text('{"text": null}\n{"text": "words here"}\n')
    summary = prepare([str(src)], str(tokenizer_dir), str(tmp_path / "o" / "n"),
                      progress=False)
    assert (summary["documents"], summary["empty_documents_skipped"]) == (1, 1)


def test_the_summary_is_written_before_the_index(tmp_path, tokenizer_dir, monkeypatch):
    """When the .idx appears its .json is already there and new: a summary write that
    fails leaves no dataset."""
    import eurocore.data.prepare as module

    src = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    monkeypatch.setattr(module, "write_json_atomically",
                        lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        prepare([str(src)], str(tokenizer_dir), str(tmp_path / "o" / "a"), progress=False)
    assert not (tmp_path / "o" / "a.idx").exists()


def _assert_intact_or_absent(prefix: Path, old: dict[str, bytes]) -> None:
    """The previous dataset is either there unchanged and readable, or not there at all
    (no .idx); never a new .bin with the old .idx."""
    idx = Path(f"{prefix}.idx")
    if idx.exists():
        IndexedDataset(prefix)  # opens: the pair belongs together
        for suffix, data in old.items():
            assert Path(f"{prefix}{suffix}").read_bytes() == data, suffix
    assert not [n for n in _listing(prefix.parent) if ".tmp" in n or n.startswith(".")]


def _good_then_bad(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(prepare_module, "TASK_DOCUMENTS", 8)
    prefix = tmp_path / "out" / "corpus"
    good = write_jsonl(tmp_path / "good.jsonl", documents(60, seed=2))
    prepare([str(good)], str(tokenizer_dir), str(prefix), progress=False)
    old = {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".json")}
    # a different corpus, long enough to write several tasks before its bad line
    bad = write_jsonl(tmp_path / "bad.jsonl", documents(50, seed=3))
    with bad.open("a") as f:
        f.write("{broken\n")
    return prefix, old, bad


def test_a_failed_rerun_keeps_the_previous_dataset(tmp_path, tokenizer_dir, monkeypatch):
    """Re-running into a prefix and failing mid-way (after tasks were written) leaves the
    previous .bin/.idx/.json as they were."""
    prefix, old, bad = _good_then_bad(tmp_path, tokenizer_dir, monkeypatch)
    with pytest.raises(ValueError, match=rf"{bad}: line 51: invalid JSON"):
        prepare([str(bad)], str(tokenizer_dir), str(prefix), workers=2, progress=False)
    assert Path(f"{prefix}.idx").exists()
    _assert_intact_or_absent(prefix, old)
    assert _listing(prefix.parent) == ["corpus.bin", "corpus.idx", "corpus.json"]


def test_a_rerun_failing_between_the_renames_never_pairs_new_and_old(
        tmp_path, tokenizer_dir, monkeypatch):
    """If publishing fails after the new .bin is in place, the old .idx is already gone:
    no dataset, rather than a new .bin read through the old index."""
    prefix, old, _ = _good_then_bad(tmp_path, tokenizer_dir, monkeypatch)
    other = write_jsonl(tmp_path / "other.jsonl", documents(70, seed=4))
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        prepare([str(other)], str(tokenizer_dir), str(prefix), progress=False)
    monkeypatch.setattr(indexed.os, "replace", real_replace)
    assert not Path(f"{prefix}.idx").exists()
    with pytest.raises(ValueError, match=r"corpus\.idx' does not exist"):
        IndexedDataset(prefix)
    _assert_intact_or_absent(prefix, old)


# --- interrupted runs ---------------------------------------------------------------------


def test_a_worker_failing_on_a_later_task_leaves_no_index(tmp_path, tokenizer_dir,
                                                          monkeypatch):
    """The first task is written, the second raises in its worker: no .idx, .bin, .json
    nor temporary file remains."""
    monkeypatch.setattr(prepare_module, "TASK_DOCUMENTS", 4)
    written = []
    real_add = IndexedDatasetWriter.add_documents
    monkeypatch.setattr(IndexedDatasetWriter, "add_documents",
                        lambda self, *a: (written.append(len(a[0])), real_add(self, *a)))
    path = write_jsonl(tmp_path / "c.jsonl", [f"document {i}" for i in range(20)])
    lines = path.read_text().splitlines()
    lines[5] = '{"text": 6}'  # line 6: the second task of four
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"{path}: line 6: 'text' is a int"):
        prepare([str(path)], str(tokenizer_dir), str(out / "c"), workers=2, progress=False)
    assert written == [4]  # the first task was written before the failure
    assert _listing(out) == []


def test_an_interrupt_leaves_nothing_and_says_so(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """Ctrl-C between tasks: exit status 130, 'nothing was written', and nothing is."""
    monkeypatch.setattr(prepare_module, "TASK_DOCUMENTS", 4)
    calls = []
    real_add = IndexedDatasetWriter.add_documents

    def add(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_add(self, *args)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", add)
    path = write_jsonl(tmp_path / "c.jsonl", [f"document {i}" for i in range(20)])
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = _cli(capsys, "--input", path, "--tokenizer", tokenizer_dir,
                           "--output-prefix", out / "c", "--quiet")
    assert code == 130
    assert stderr == f"{PROG}: interrupted; nothing was written\n"
    assert _listing(out) == []


# --- progress -------------------------------------------------------------------------------


def test_the_progress_line(tmp_path, tokenizer_dir, tokenizer, capsys):
    """Not a terminal: the final forced update prints one line with documents, rates, the
    share read and ETA to stderr; --quiet prints nothing there."""
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    documents_count = len(_expected(tokenizer, CORPUS))
    prepare([str(path)], str(tokenizer_dir), str(tmp_path / "a"), progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err, err
    assert err.startswith(f"prepare: {documents_count} documents (")
    assert "tokens (" in err and "/s)" in err and "100% of the input" in err
    assert "ETA 00:00:00" in err

    code, out, err = _cli(capsys, "--input", path, "--tokenizer", tokenizer_dir,
                          "--output-prefix", tmp_path / "b", "--quiet")
    assert code == 0 and err == ""
    assert out.startswith(f"wrote {tmp_path / 'b'}.bin/.idx/.json: {documents_count} documents")

    code, _, err = _cli(capsys, "--input", path, "--tokenizer", tokenizer_dir,
                        "--output-prefix", tmp_path / "c")
    assert code == 0 and "ETA" in err and "documents" in err


# --- special tokens -----------------------------------------------------------------------


def _tokenizer_with_bos(tokenizer_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """The test tokenizer plus a "<s>" special token that its post-processor prepends."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    directory = tmp_path / "bos-tokenizer"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return directory, bos


def test_add_special_tokens(tmp_path, tokenizer_dir, tokenizer):
    """A tokenizer without a post-processor: the flag changes nothing. One whose
    post-processor prepends <s>: every document starts with its id, only with the flag."""
    source = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    expected = _expected(tokenizer, CORPUS)

    def run(tok, name, special):
        prefix = tmp_path / name
        summary = prepare([str(source)], str(tok), str(prefix), progress=False,
                          add_special_tokens=special)
        assert summary["add_special_tokens"] is special
        return _read_back(prefix)

    assert run(tokenizer_dir, "plain", False) == run(tokenizer_dir, "plain-special", True)
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "plain-special.bin").read_bytes()

    bos_dir, bos = _tokenizer_with_bos(tokenizer_dir, tmp_path)
    assert bos == 500  # added after the 500 trained ids
    assert run(bos_dir, "bos-off", False) == expected
    with_bos = run(bos_dir, "bos-on", True)
    assert with_bos == [[bos, *ids] for ids in expected]
    assert all(doc[0] == bos and doc.count(bos) == 1 for doc in with_bos)
