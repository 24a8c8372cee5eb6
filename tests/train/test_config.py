"""The run's configuration: the command line is generated from TrainConfig's fields, a TOML
file round-trips, flags override the file, and bad files name the key and the file."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from eurocore.train.cli import build_parser, parse_config
from eurocore.train.config import TrainConfig, field_specs, load_config, to_toml
from eurocore.train.preemption import PREEMPTED_EXIT_STATUS


def _parser():
    return build_parser("eurocore train", "test")


def test_every_field_has_an_option_with_its_default_and_help():
    """One source of truth: each field (but the file-only ones) is an option whose help is
    the field's, and no option exists that is not a field."""
    parser = _parser()
    help_text = parser.format_help()
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    specs = [spec for spec in field_specs() if spec.cli]
    assert dests == {spec.name for spec in specs}
    for spec in specs:
        assert spec.flags[0] in help_text
        assert spec.help.split()[0] in help_text
    assert parse_config(parser, []) == TrainConfig()


def test_flags_reach_their_fields():
    config = parse_config(_parser(), [
        "--tp", "2", "--layers", "4", "--layers-per-stage", "2,2", "--pp", "2",
        "--sequence-parallel", "--global-batch-size", "8", "--lr", "1e-3", "--bf16", "off",
        "--device", "cpu"])
    assert (config.tp, config.num_layers, config.layers_per_stage, config.pp) == (2, 4, (2, 2),
                                                                                2)
    assert config.sequence_parallel and config.batch_size == 8 and config.lr == 1e-3
    assert config.bf16 is False and config.device == "cpu"
    assert config.model_config().num_layers == 4


def test_toml_round_trip(tmp_path):
    config = TrainConfig(tp=2, num_layers=4, pp=2, layers_per_stage=(1, 3), lr=1e-3,
                         min_lr=1e-5, bf16=True, metrics_json="m.json",
                         model_overrides={"hidden_size": 128, "rope_scaling": {
                             "rope_type": "linear", "factor": 2.0}})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config
    # sections as documented
    text = path.read_text()
    for section in ("[model]", "[parallel]", "[optimizer]", "[data]", "[logging]", "[run]"):
        assert section in text
    assert "hidden_size = 128" in text  # model overrides live in [model]


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optimizer]\nlr = 0.001\nsteps = 50\n[parallel]\ntp = 2\n")
    config = parse_config(_parser(), ["--config", str(path), "--lr", "0.002"])
    assert (config.lr, config.steps, config.tp) == (0.002, 50, 2)


@pytest.mark.parametrize("text, message", [
    ("[optimizer]\nwarmup_step = 10\n", r"unknown key optimizer.warmup_step .*; did you "
                                        r"mean 'warmup_steps'\?"),
    ("[optimzer]\nlr = 0.1\n", r"unknown section \[optimzer\] .*; did you mean 'optimizer'\?"),
    ("[optimizer]\ntp = 2\n", r"unknown key optimizer.tp .* \(it belongs in \[parallel\]\)"),
    ("[optimizer]\nlr = \"fast\"\n", r"optimizer.lr in .* must be a number, got 'fast'"),
    ("[parallel]\nsequence_parallel = 1\n", r"parallel.sequence_parallel .* must be a boolean"),
    ("[parallel]\nlayers_per_stage = [1, \"2\"]\n", r"must be an array of integers"),
    ("[model]\nhidden_sise = 64\n", r"unknown key model.hidden_sise .*; did you mean "
                                    r"'hidden_size'\?"),
    ("lr = 0.1\n", r"unknown section \[lr\]"),
    ("[optimizer\n", r"is not valid TOML"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^config: .*{message}") as info:
        load_config(path)
    assert str(path) in str(info.value) or "unknown section" in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^config: '.*nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml")


def test_values_from_the_file_are_checked_like_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optimizer]\nlr = 2.0\n")
    with pytest.raises(ValueError, match=r"^config: optimizer.lr in '.*run.toml': expected a "
                                         r"finite number in \(0.0, 1.0\]"):
        load_config(path)


def test_field_specs_cover_every_field():
    assert [s.name for s in field_specs()] == [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("name, world", [("eurollm-9b-lumi.toml", 16),
                                         ("llama3-8b-nvidia.toml", 8)])
def test_shipped_configs_load_and_fit_their_scripts(name, world):
    """Every config in configs/ is valid and fits the ranks of the SLURM script using it,
    which requeues the job when a signal stopped it after a checkpoint."""
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "configs" / name)
    config.layout(world)
    script = (root / "scripts" / "slurm" / ("lumi.sbatch" if "lumi" in name
                                            else "nvidia.sbatch")).read_text()
    assert f"--config configs/{name}" in script
    # SLURM's warning signal, and a requeue on the status a stopped run exits with
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    assert f'"$status" -eq {PREEMPTED_EXIT_STATUS} ]' in script
    assert config.checkpoint_every > 0 and config.output_dir  # a requeue resumes there
    subprocess.run(["bash", "-n", "-c", script], check=True)  # the script parses


def test_a_run_directory_config_is_read_back_as_it_is(tmp_path, monkeypatch):
    """A run writes its resolved config.toml; --config reads it to the same config."""
    import eurocore.train.__main__ as cli

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    runs = []
    monkeypatch.setattr(cli, "train", lambda config, *a, **k: runs.append(config) or [])
    argv = ["--steps", "3", "--lr", "0.001", "--layers", "3", "--output-dir",
            str(tmp_path / "run"), "--device", "cpu"]
    assert cli.main(argv) == 0
    written = tmp_path / "run" / "config.toml"
    assert parse_config(_parser(), ["--config", str(written)]) == runs[0]


def test_every_boolean_can_be_turned_either_way_over_a_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[parallel]\nsequence_parallel = true\n[data]\ndocument_masking = false\n")
    config = parse_config(_parser(), ["--config", str(path), "--no-sequence-parallel",
                                      "--document-masking"])
    assert not config.sequence_parallel and config.document_masking


@pytest.mark.parametrize("text, message", [
    ("[model]\nhidden_size = 8.5\n", r"model.hidden_size in .* must be an integer"),
    ("[model]\nrope_theta = \"big\"\n", r"model.rope_theta in .* must be a number"),
    ("[model]\nnum_layers = 0\n", r"model.num_layers in '.*run.toml': .*"),
    ("[data]\ndata_path = [\"0.5\", \"a\", \"b\"]\n", r"data.data_path in '.*run.toml': "),
])
def test_model_overrides_and_values_from_a_file_name_the_file(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises((TypeError, ValueError), match=rf"^config: {message}"):
        load_config(path)


def test_a_check_across_fields_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nnum_heads = 3\n")
    with pytest.raises(ValueError, match=r"^hidden_size: .* num_heads = 3 .*'.*run.toml'"):
        load_config(path)


def test_a_run_config_holds_absolute_paths(tmp_path, monkeypatch):
    """Read from another directory, a run's config.toml means the same files."""
    import eurocore.train.__main__ as cli

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    runs = []
    monkeypatch.setattr(cli, "train", lambda config, *a, **k: runs.append(config) or [])
    assert cli.main(["--steps", "2", "--metrics-json", "m.json", "--device", "cpu"]) == 0
    (written,) = (tmp_path / "runs").glob("*/config.toml")
    monkeypatch.chdir(tmp_path / "runs")
    again = parse_config(_parser(), ["--config", str(written)])
    assert again == runs[0]
    assert again.metrics_json == str(tmp_path / "m.json")
    assert again.output_dir == str(written.parent)
