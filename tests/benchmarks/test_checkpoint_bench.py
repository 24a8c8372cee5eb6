"""The checkpoint benchmark (eurocore.benchmarks.checkpoint): a --quick run on two gloo
processes measures every row (saves, a same-layout load, a reshard load) with figures that
agree with the files it wrote; its summaries take the slowest rank; layouts parse; bad
options exit 2 naming the option before any process starts."""

from __future__ import annotations

import json

import pytest

from eurocore.benchmarks import checkpoint as bench


def test_quick_run_measures_every_row(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert bench.main(["--quick", "--out", str(out), "--workdir", str(work), "--plot"]) == 0
    (result,) = out.glob("*-checkpoint.json")
    assert result.with_suffix(".png").stat().st_size > 0
    data = json.loads(result.read_text())
    assert data["settings"]["save_layout"] == "dp2" and data["settings"]["load_layout"] == "tp2"
    disk = data["disk"]
    assert disk["bytes"] == 16 << 20 and disk["write_gb_per_s"] > 0 and disk["read_gb_per_s"] > 0
    sync, async_, load, reshard = data["rows"]
    assert (sync["case"], async_["case"]) == ("sync", "async")
    saves = data["settings"]["saves"]
    for row in (sync, async_):
        assert row["wait_ms"] > 0 and len(row["wait_ms_per_save"]) == saves
        assert row["wait_ms"] <= max(row["wait_ms_per_save"])
    # both ranks wrote a share of the files: about half of the weights and moments each
    assert len(sync["bytes_per_rank"]) == 2 and min(sync["bytes_per_rank"]) > 0
    assert sync["gb_per_s_per_rank_min"] <= sync["gb_per_s_per_rank_median"]
    assert async_["fraction_of_sync"] == pytest.approx(async_["wait_ms"] / sync["wait_ms"])
    assert async_["goal_met"] == (async_["fraction_of_sync"] < bench.GOAL_ASYNC_FRACTION)
    for row in (load, reshard):
        assert row["load_ms"] > 0 and row["verify_ms"] > 0
        assert row["cold_cache"] is True
    # what the ranks read is what was stored: dp2's boxes and tp2's boxes cover the same
    # tensors (rng states aside: the reshard load reads none)
    assert sum(reshard["bytes_per_rank"]) <= sum(load["bytes_per_rank"])
    assert sum(load["bytes_per_rank"]) <= sum(sync["bytes_per_rank"])
    printed = capsys.readouterr().out
    assert "CPU FIGURES" in printed and "dp2 -> tp2" in printed
    assert "the file system, one stream of 0.0 GiB: write + fsync" in printed
    assert list(work.iterdir()) == []  # the checkpoints are gone


def test_summaries_take_the_slowest_rank():
    def rank(waits, steps, nbytes):
        return {"steps_between_s": 1.0,
                "sync": {"wait_s": waits, "steps_between_s": steps, "drain_s": 0.0,
                         "bytes": nbytes},
                "async": {"wait_s": [w / 20 for w in waits], "steps_between_s": steps,
                          "drain_s": 0.5},
                "load": {"verify_s": 0.1, "load_s": 2.0, "bytes": nbytes, "cold_cache": True}}

    ranks = [rank([1.0, 2.0, 3.0], [1.0, 1.5, 1.5], 4e9), rank([2.0, 2.0, 4.0], [1.0, 1.0, 1.0],
                                                               2e9)]
    sync, async_ = bench.summarize_saves(ranks)
    assert sync["wait_ms"] == pytest.approx(2000)  # the medians, 2 s and 2 s
    assert sync["wait_ms_per_save"] == pytest.approx([2000, 2000, 4000])
    assert sync["gb_per_s_per_rank_min"] == pytest.approx(1.0)     # 2 GB in 2 s
    assert sync["gb_per_s_per_rank_median"] == pytest.approx(1.5)  # and 4 GB in 2 s
    assert sync["gb_per_s_all_ranks"] == pytest.approx(3.0)  # 6 GB by the slowest, in 2 s
    assert sync["step_slowdown_ms"] == pytest.approx(500)
    assert async_["fraction_of_sync"] == pytest.approx(0.05) and async_["goal_met"] is True
    assert async_["drain_ms"] == pytest.approx(500)
    load = bench.summarize_load(ranks, "x")
    assert load["load_ms"] == pytest.approx(2000) and load["gb_per_s_per_rank_min"] == 1.0


@pytest.mark.parametrize("name, world, fields", [
    ("one", 1, {}), ("dp2", 2, {}), ("tp2", 2, {"tp": 2}), ("pp2v2", 2, {"pp": 2, "vpp": 2}),
    ("tp2pp2sp", 4, {"tp": 2, "pp": 2, "sequence_parallel": True}), ("dp2tp2", 4, {"tp": 2}),
])
def test_layout_names(name, world, fields):
    assert bench.parse_layout(name) == (world, fields)


@pytest.mark.parametrize("argv, option", [
    (["--save-layout", "tp2x"], "--save-layout"),
    (["--save-layout", "tp0"], "--save-layout"),
    (["--load-layout", "tp3"], "--load-layout"),  # the tiny model's heads do not split in 3
    (["--saves", "0"], "--saves"),
    (["--steps-between", "0"], "--steps-between"),
    (["--seq-len", "100000"], "--seq-len"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", *argv, "--out", str(tmp_path / "out"), "--workdir",
                    str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: {option}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_page_cache_drop_leaves_the_files_whole(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    assert bench.drop_page_cache(tmp_path) is True
    assert (tmp_path / "a").read_bytes() == b"x" * 10_000
