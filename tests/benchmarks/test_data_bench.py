"""The data pipeline benchmark (eurocore.benchmarks.data) at its --quick sizes, in process:
every part measured with positive figures, the megatron-core rows measured where it is
installed (same output bytes) and marked "not installed" where it is not, the JSON written
after each part, and bad options refused with exit status 2 naming the option."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from eurocore.benchmarks import data as bench
from eurocore.data.indexed import IndexedDataset


def _results(out: Path) -> dict:
    (path,) = out.iterdir()
    assert path.name.endswith("-data.json")
    return json.loads(path.read_text())


def _no_megatron(monkeypatch) -> None:
    """Every megatron import fails, as where megatron-core is not installed."""
    for name in [n for n in sys.modules if n == "megatron" or n.startswith("megatron.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "megatron", None)


@pytest.mark.slow
def test_quick_run_measures_every_part(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert bench.main(["--quick", "--out", str(out), "--workdir", str(work)]) == 0
    data = _results(out)
    assert set(data["parts"]) == {"prepare", "index", "loader"}
    assert data["environment"]["device_name"] and data["method"]["index_build"]
    installed = bench.load_megatron()[0] is not None

    def reference_ok(row: dict) -> bool:
        ref = row["reference"]
        assert ref["status"] == ("ok" if installed else "not installed"), ref
        return ref["status"] == "ok"

    prepare = data["parts"]["prepare"]
    assert [r["workers"] for r in prepare] == [1, 2]
    for row in prepare:
        assert row["eurocore"]["status"] == "ok"
        assert row["eurocore"]["tokens"] > 0 and row["eurocore"]["tokens_per_s"] > 0
        assert row["eurocore"]["tokens_per_s_per_worker"] == pytest.approx(
            row["eurocore"]["tokens_per_s"] / row["workers"])
        if reference_ok(row):
            assert row["reference"]["tokens"] == row["eurocore"]["tokens"]
            assert row["reference"]["identical_output"] is True
            assert row["reference"]["tokens_per_s"] > 0 and row["speedup"] > 0

    index = data["parts"]["index"]
    sizes = data["settings"]["sizes"]
    assert sorted({r["tokens"] for r in index}) == sorted(sizes)
    for size in sizes:
        stages = {r["case"]: r for r in index if r["tokens"] == size}
        label = bench._tokens_label(size)
        assert set(stages) == {f"write {label} tokens", f"build {label}, cold cache",
                               f"build {label}, warm cache"}
        write = stages[f"write {label} tokens"]
        assert write["eurocore"]["tokens_per_s"] > 0
        if reference_ok(write):
            assert write["reference"]["identical_output"] is True
        for temperature in ("cold", "warm"):
            build = stages[f"build {label}, {temperature} cache"]
            assert build["eurocore"]["status"] == "ok"
            assert build["eurocore"]["seconds"] > 0
            assert len(build["eurocore"]["runs_s"]) == bench.BUILD_REPEATS
            assert build["eurocore"]["rows"] == data["settings"]["rows"]
            # cold: every permutation computed; warm: every one read from the cache
            assert (build["eurocore"]["cache_hits"] == 0) == (temperature == "cold")
            assert build["goal"] == "no slower than megatron-core"
            if reference_ok(build):
                assert build["reference"]["seconds"] > 0
                assert build["goal_met"] == (build["eurocore"]["seconds"]
                                             <= build["reference"]["seconds"])

    loader = data["parts"]["loader"]
    assert [r["workers"] for r in loader] == [0, 2]
    for row in loader:
        ours = row["eurocore"]
        assert ours["status"] == "ok" and ours["tokens_per_s"] > 0
        assert ours["steps"] == data["settings"]["steps"]
        assert ours["tokens_counted"] == (ours["steps"] - 1) * row["rows"] * bench.SEQ_LEN
        assert row["goal_met"] == (ours["tokens_per_s"] >= bench.GOAL_LOADER_TOKENS_PER_S)
        if reference_ok(row):
            assert row["reference"]["tokens_per_s"] > 0

    printed = capsys.readouterr().out
    assert "tok/s/rank" in printed and ">= 70,000 tokens/s per rank" in printed
    if data["environment"]["is_cpu"]:
        assert "CPU FIGURES" in printed
    assert list(work.iterdir()) == []  # the synthetic files are gone


def test_without_megatron_the_reference_rows_say_not_installed(tmp_path, monkeypatch,
                                                               capsys):
    _no_megatron(monkeypatch)
    out = tmp_path / "out"
    assert bench.main(["--quick", "--parts", "index", "--sizes", "2e5", "--out", str(out),
                       "--workdir", str(tmp_path / "work")]) == 0
    rows = _results(out)["parts"]["index"]
    assert len(rows) == 3
    for row in rows:
        assert row["eurocore"]["status"] == "ok"
        assert row["reference"]["status"] == "not installed"
        assert row["speedup"] is None and row["goal_met"] is None
    assert "not installed" in capsys.readouterr().out


def test_keep_leaves_the_synthetic_files(tmp_path):
    work = tmp_path / "work"
    assert bench.main(["--quick", "--parts", "loader", "--out", str(tmp_path / "out"),
                       "--workdir", str(work), "--keep", "--steps", "2"]) == 0
    (run,) = work.iterdir()
    assert run.name.startswith("eurocore-databench-")


def test_synthetic_documents_sum_exactly_and_end_in_eod(tmp_path):
    rng = np.random.default_rng(0)
    lengths = bench.document_lengths(123_457, rng)
    assert lengths.sum() == 123_457 and lengths.min() >= 2
    assert 400 < lengths.mean() < 800  # lognormal with mean DOC_MEAN
    written = bench.write_synthetic(str(tmp_path / "s"), 50_000, seed=3)
    dataset = IndexedDataset(tmp_path / "s")
    assert dataset.num_tokens == written["tokens"] == 50_000
    assert dataset.num_documents == written["documents"]
    tokens = dataset.tokens()
    ends = np.cumsum(dataset.document_lengths)
    assert (tokens[ends - 1] == bench.EOD).all()
    assert np.count_nonzero(tokens == bench.EOD) == dataset.num_documents


def test_tokens_label():
    assert bench._tokens_label(100_000_000) == "1e8"
    assert bench._tokens_label(250_000) == "2.5e5"
    assert bench._tokens_label(123_457) == "123,457"


@pytest.mark.parametrize("argv, option", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "lots"], "--sizes"),
    (["--sizes", "3e4"], "--sizes"),  # below --rows x 4096 + 1 at the default 8 rows
    (["--parts", "nope"], "--parts"),
    (["--parts", "index,nope"], "--parts"),
    (["--rows", "0"], "--rows"),
    (["--steps", "1"], "--steps"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path / "out"), "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: {option}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_and_workdir_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for option in ("--out", "--workdir"):
        argv = ["--quick", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path)]
        argv[argv.index(option) + 1] = str(blocker / "sub")
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert f"error: {option}: cannot write under" in capsys.readouterr().err


def test_missing_tokenizer_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--parts", "prepare", "--tokenizer", str(tmp_path / "none"),
                    "--out", str(tmp_path / "out"), "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error: --tokenizer:" in capsys.readouterr().err


def test_a_run_cut_short_keeps_the_parts_it_measured(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_loader", interrupted)
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--parts", "index", "loader", "--sizes", "2e5", "--out",
                    str(out), "--workdir", str(work)])
    data = _results(out)
    assert list(data["parts"]) == ["index"] and len(data["parts"]["index"]) == 3
    assert data["peak_rss_mib"]["self"] > 0
    assert list(work.iterdir()) == []
