"""The README's "Train on your own text", shortened: eurocore data example, prepare of every
format it writes, and a run on the blend whose loss falls and whose validation is logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eurocore.data.__main__ import main as data_main
from eurocore.data.indexed import IndexedDataset


@pytest.mark.slow
def test_the_readme_path_from_text_to_a_trained_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert data_main(["example", "examples", "--documents", "300"]) == 0
    monkeypatch.chdir(tmp_path / "examples")
    for argv in (["--input", "corpus/en.jsonl", "corpus/de.jsonl.gz", "--output-prefix",
                  "data/west", "--workers", "2"],
                 ["--input", "corpus/fi.jsonl.zst", "--output-prefix", "data/fi"],
                 ["--input", "corpus/fr.txt", "--line-docs", "--output-prefix", "data/fr"]):
        assert data_main(["prepare", *argv, "--tokenizer", "tokenizer", "--quiet"]) == 0
    assert IndexedDataset("data/west").num_documents == 600
    assert IndexedDataset("data/fr").num_documents == 300
    metrics = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "eurocore.train", "--data-path", "0.5", "data/west", "0.25",
         "data/fi", "0.25", "data/fr", "--tokenizer", "tokenizer", "--split", "95,5",
         "--seq-len", "64", "--global-batch-size", "8", "--steps", "60", "--eval-every",
         "30", "--log-every", "10", "--output-dir", "runs/example", "--metrics-json",
         str(metrics), "--data-workers", "1"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads(metrics.read_text())
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert [m["step"] for m in history if "valid_loss" in m] == [29, 59]
    assert "3 source(s)" in result.stdout and "validation: the split" in result.stdout
    assert (tmp_path / "examples" / "runs" / "example" / "config.toml").is_file()
