"""Checkpoints (eurocore.train.checkpoint): bit-exact resume in the same layout; resharding
between TP, PP (virtual stages), SP and DP layouts, every weight and moment checked against
one process's; a data-parallel resize with the data position exact; damage and the
fallback; what a resume refuses; keep_last; async saves and their failures; inspect."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import eurocore.train.checkpoint as checkpoint
from eurocore.__main__ import main as eurocore_main
from eurocore.parallel import local_part
from eurocore.train.checkpoint import CheckpointError, checkpoint_dirs
from eurocore.train.distributed import Process
from eurocore.train.preemption import Preempted, StopSignals
from eurocore.train.trainer import TrainConfig, Trainer, train
from tests.parallel.launch import run_on_ranks

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHORT = {"steps": 6, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_every": 1,
         "data_workers": 0}


def _losses(trainer: Trainer, steps: int) -> list[torch.Tensor]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


# -------------------------------------------------------------------------------------------
# Same layout: bit for bit
# -------------------------------------------------------------------------------------------


GPU = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a GPU"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("device", ["cpu", GPU])
def test_a_resumed_run_takes_the_same_steps_bit_for_bit(tmp_path, async_save, device):
    """Saved after 3 of 6 steps (in the background or not), a new Trainer resumes and takes
    steps 3-5 exactly as the uninterrupted run: losses, gradient norms, parameters. On a GPU
    the async save stages through pinned host buffers and the CUDA generator is restored."""
    config = TrainConfig(**SHORT, micro_batch_size=2, checkpoint_dir=str(tmp_path),
                         async_checkpoint=async_save)
    process = Process(0, 1, 0, torch.device(device))
    first = Trainer(config, process, log=lambda _: None)
    _losses(first, 3)
    first.save_checkpoint()
    expected = [first.train_step() for _ in range(3)]
    first.checkpointer.close()

    second = Trainer(config, process, log=lambda _: None)
    assert second.resume() and second.step == 3
    for want, got in zip(expected, [second.train_step() for _ in range(3)], strict=True):
        assert torch.equal(want["loss"], got["loss"]) and want["lr"] == got["lr"]
        assert torch.equal(want["grad_norm"], got["grad_norm"])
    for (name, a), (_, b) in zip(first.model.named_parameters(),
                                 second.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_finished_run_run_again_trains_nothing_and_says_so(tmp_path):
    config = TrainConfig(**{**SHORT, "steps": 2}, checkpoint_dir=str(tmp_path))
    assert len(train(config, CPU, log=lambda _: None)) == 2
    lines: list[str] = []
    assert train(config, CPU, log=lines.append) == []
    assert "done: the run is at step 2, the end of its 2 steps; nothing to train (a larger " \
           "--steps goes on)" in lines


def test_a_checkpoint_holds_each_weight_once_whole(tmp_path):
    """The stored tensors are the full model's, under layout-free names (q, k, v and gate,
    up apart; the vocabulary unpadded), each of its global shape; nothing of a rank's view
    of its storage beyond its box is written (the files hold the weights and two moments,
    no more)."""
    config = TrainConfig(**SHORT, checkpoint_dir=str(tmp_path))
    trainer = Trainer(config, CPU, log=lambda _: None)
    trainer.save_checkpoint()
    path = checkpoint_dirs(tmp_path)[0]
    metadata = torch.distributed.checkpoint.FileSystemReader(str(path)).read_metadata()
    shapes = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
              if hasattr(v, "size")}
    model = trainer.model_config
    head_dim = model.hidden_size // model.num_heads
    assert shapes["model.layers.0.attention.q.weight"] == (model.hidden_size,) * 2
    assert shapes["model.layers.0.attention.k.weight"] == (model.num_kv_heads * head_dim,
                                                           model.hidden_size)
    assert shapes["model.layers.1.mlp.up.weight"] == (model.ffn_hidden_size, model.hidden_size)
    assert shapes["optimizer.embedding.weight.exp_avg"] == (model.vocab_size, model.hidden_size)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    stored = sum(v for k, v in ((k, torch.Size(s).numel()) for k, s in shapes.items())
                 if not k.startswith("rng."))
    assert stored == 3 * parameters
    on_disk = sum(f.stat().st_size for f in path.glob("*.distcp"))
    assert 3 * 4 * parameters <= on_disk < 3 * 4 * parameters * 1.1


# -------------------------------------------------------------------------------------------
# Another layout: resharding
# -------------------------------------------------------------------------------------------

RESHARD = {"steps": 4, "batch_size": 4, "seq_len": 32, "warmup_steps": 1, "log_every": 1,
           "data_workers": 0, "micro_batch_size": 1,
           "model_overrides": {"num_layers": 4, "tie_embeddings": True}}
LAYOUTS = {"one": (1, {}), "tp2": (2, {"tp": 2}), "pp2v2": (2, {"pp": 2, "vpp": 2}),
           "dp2": (2, {}), "tp2pp2sp": (4, {"tp": 2, "pp": 2, "sequence_parallel": True}),
           "dp2tp2": (4, {"tp": 2}), "dp4": (4, {}),
           "tp4": (4, {"tp": 4}),  # 250 tokens: the only layout with vocabulary padding
           "pp2uneven": (2, {"pp": 2, "layers_per_stage": (1, 3)})}
SAVED_IN = ("tp2", "pp2v2", "dp2", "tp2pp2sp", "dp2tp2", "tp4", "pp2uneven")
# each layout loads at least three checkpoints of other layouts (one process loads all)
LOADS = {"tp2": ("one", "pp2v2", "tp2pp2sp", "dp2tp2"), "pp2v2": ("one", "tp2", "tp2pp2sp",
                                                                  "dp2"),
         "tp2pp2sp": ("one", "tp2", "pp2v2", "dp2tp2"), "dp2tp2": ("one", "pp2v2", "tp2pp2sp",
                                                                   "dp2"),
         "dp4": ("dp2", "tp2", "one"), "tp4": ("one", "dp2tp2", "pp2uneven"),
         "pp2uneven": ("one", "tp4", "tp2pp2sp")}


def _process(rank: int, world: int) -> Process:
    return Process(rank, world, rank, torch.device("cpu"))


def _save_layouts(rank: int, world: int, root: str, names: list[str]) -> None:
    """Each layout trains 2 steps and saves; dp2 also goes on uninterrupted for 2 more."""
    for name in names:
        config = TrainConfig(**RESHARD, **LAYOUTS[name][1], checkpoint_dir=f"{root}/{name}")
        trainer = Trainer(config, _process(rank, world), log=lambda _: None)
        _losses(trainer, 2)
        trainer.save_checkpoint()
        if name == "dp2":
            torch.save([loss.item() for loss in _losses(trainer, 2)],
                       f"{root}/dp2-uninterrupted-{rank}.pt")
        trainer.checkpointer.close()


def _one_process_view(trainer: Trainer) -> dict:
    """One process's parameters and AdamW moments by parameter name."""
    (chunk,) = trainer.model
    state = trainer.optimizer.state
    return {name: (p.detach().clone(), state[p]["exp_avg"].clone(),
                   state[p]["exp_avg_sq"].clone()) for name, p in chunk.named_parameters()}


def _dp_share(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """FSDP2's rows of ``local`` on this rank (torch.chunk over the DP mesh), written out
    here rather than taken from eurocore.parallel.sharding, to check that too."""
    if not hasattr(param, "to_local"):
        return local
    mesh = param.device_mesh
    chunks = torch.chunk(local, mesh.size())
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else local[:0]


def _load_layouts(rank: int, world: int, root: str, names: list[str], views: dict,
                  losses: dict) -> None:
    """Each layout loads the checkpoints of LOADS: its weights and moments equal one
    process's view of the same checkpoint bit for bit (through the layers' own local_shard,
    not the checkpoint's slicing), and its next 2 losses match one process's."""
    for name in names:
        for saved_in in LOADS[name]:
            config = TrainConfig(**RESHARD, **LAYOUTS[name][1],
                                 checkpoint_dir=f"{root}/{saved_in}", keep_last=0)
            trainer = Trainer(config, _process(rank, world), log=lambda _: None)
            assert trainer.resume() and trainer.step == 2, (name, saved_in)
            where = f"{saved_in} -> {name}"
            for chunk in trainer.model:
                for pname, param in chunk.named_parameters():
                    module = chunk.get_submodule(pname.rpartition(".")[0])
                    full = views[saved_in].get(pname, views[saved_in].get("embedding.weight"))
                    moments = trainer.optimizer.state[param]
                    for got, want in zip((param, moments["exp_avg"], moments["exp_avg_sq"]),
                                         full, strict=True):
                        want = module.local_shard(want) if hasattr(module, "local_shard") \
                            else want
                        assert torch.equal(local_part(got.detach()), _dp_share(want, param)), \
                            f"{where}: {pname}"
            got = [loss.item() for loss in _losses(trainer, 2)]
            assert got == pytest.approx(losses[saved_in], rel=1e-5), (where, got)
            trainer.checkpointer.close()


@pytest.mark.slow
def test_checkpoints_load_in_every_other_layout(tmp_path):
    """Saved in one process, TP2, PP2 with 2 virtual stages, DP2, TP2 x PP2 with SP,
    DP2 x TP2, TP4 (whose vocabulary is padded) and PP2 split 1 + 3 (tied embeddings, so
    the last stage's copy and the vocabulary padding are resharded too), each checkpoint
    loads in at least three other layouts (and one process): every weight and moment equals
    one process's view, and the next steps' losses match one process's. DP2's checkpoint
    also resumes at DP1 and DP4 with the uninterrupted DP2 run's losses: the data position
    is exact."""
    root = str(tmp_path)
    _save_layouts(0, 1, root, ["one"])
    run_on_ranks(_save_layouts, 2, root, [n for n in SAVED_IN if LAYOUTS[n][0] == 2])
    run_on_ranks(_save_layouts, 4, root, [n for n in SAVED_IN if LAYOUTS[n][0] == 4])

    uninterrupted = Trainer(TrainConfig(**RESHARD), CPU, log=lambda _: None)
    straight = [loss.item() for loss in _losses(uninterrupted, 4)]
    views, losses = {}, {}
    for saved_in in ("one", *SAVED_IN):
        config = TrainConfig(**RESHARD, checkpoint_dir=f"{root}/{saved_in}")
        trainer = Trainer(config, CPU, log=lambda _: None)
        assert trainer.resume() and trainer.step == 2
        views[saved_in] = _one_process_view(trainer)
        losses[saved_in] = [loss.item() for loss in _losses(trainer, 2)]
    assert losses["one"] == straight[2:]  # the same layout: bit for bit
    dp2 = torch.load(f"{root}/dp2-uninterrupted-0.pt")
    assert losses["dp2"] == pytest.approx(dp2, rel=1e-5)  # DP2 -> DP1

    run_on_ranks(_load_layouts, 2, root, [n for n in LOADS if LAYOUTS[n][0] == 2], views,
                 losses)
    # dp4 (in _load_layouts) resumes DP2's checkpoint with the losses of one process's
    # resume from it, which are DP2 going on (above)
    run_on_ranks(_load_layouts, 4, root, [n for n in LOADS if LAYOUTS[n][0] == 4], views,
                 losses)


# -------------------------------------------------------------------------------------------
# Damage, fallback and what a resume refuses
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run's checkpoint directory with step-00000002 and step-00000004 (latest)."""
    directory = tmp_path_factory.mktemp("damage") / "checkpoints"
    train(TrainConfig(**{**SHORT, "steps": 4}, checkpoint_dir=str(directory),
                      checkpoint_every=2), CPU, log=lambda _: None)
    assert [p.name for p in checkpoint_dirs(directory)] == ["step-00000004", "step-00000002"]
    return directory


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda p: _truncate(p / "__0_0.distcp"), r"__0_0.distcp' has \d+ bytes, "
                  r"\d+ were written"),
    "deleted": (lambda p: (p / "__0_0.distcp").unlink(), r"__0_0.distcp' is missing"),
    "flipped": (lambda p: _flip(p / "__0_0.distcp"), r"__0_0.distcp' is corrupted"),
    "metadata": (lambda p: _truncate(p / ".metadata"), r"\.metadata' has \d+ bytes"),
    "no-info": (lambda p: (p / "eurocore.json").unlink(), r"eurocore.json' is missing"),
}


def _resume_in(directory: Path, resume: str = "auto") -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    trainer = Trainer(TrainConfig(**SHORT, checkpoint_dir=str(directory), resume=resume), CPU,
                      log=lines.append)
    trainer.resume()
    return trainer, lines


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_auto_falls_back(two_checkpoints, tmp_path, damage):
    """Damage to the latest checkpoint: --resume auto says what is wrong, naming the file,
    and resumes from the previous one; --resume naming it is an error naming the file."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    harm, message = DAMAGE[damage]
    harm(directory / "step-00000004")
    trainer, lines = _resume_in(directory)
    assert trainer.step == 2
    assert any(line.startswith("checkpoint: skipping step-00000004") and
               __import__("re").search(message, line) for line in lines), lines
    with pytest.raises(ValueError, match=rf"^resume: .*{message}"):
        _resume_in(directory, resume=str(directory / "step-00000004"))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(two_checkpoints, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    for path in checkpoint_dirs(directory):
        _flip(path / "__0_0.distcp")
    with pytest.raises(ValueError, match=r"^resume: no checkpoint in .* is intact .*"
                                         r"--resume none starts afresh"):
        _resume_in(directory)
    assert _resume_in(directory, resume="none")[0].step == 0


def test_a_missing_latest_takes_the_newest_intact_checkpoint(two_checkpoints, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    (directory / "latest").unlink()
    trainer, lines = _resume_in(directory)
    assert trainer.step == 4 and any("latest' is missing" in line for line in lines), lines


def test_an_interrupted_save_is_removed_and_never_read(two_checkpoints, tmp_path):
    """A kill during a save leaves step-N.tmp: the next start removes it, saying so, and
    resumes from the checkpoint latest names."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    stale = directory / "step-00000006.tmp"
    shutil.copytree(directory / "step-00000004", stale)
    _truncate(stale / "__0_0.distcp")
    trainer, lines = _resume_in(directory)
    assert trainer.step == 4 and not stale.exists()
    assert any("removing step-00000006.tmp" in line for line in lines), lines


@pytest.mark.parametrize("change, message", [
    ({"model_overrides": {"hidden_size": 128, "num_heads": 8, "num_kv_heads": 4}},
     r"^hidden_size: the checkpoint's model has hidden_size = 64, this run's 128"),
    ({"model_overrides": {"num_layers": 3}}, r"^num_layers: .* = 2, this run's 3"),
    ({"batch_size": 8}, r"^batch_size: the checkpoint's run took 4 sequences per step"),
    ({"data_seed": 5}, r"^data: the saved run's data differs in seed"),
])
def test_a_resume_refuses_another_model_shape_batch_or_data(two_checkpoints, change, message):
    config = TrainConfig(**{**SHORT, **change}, checkpoint_dir=str(two_checkpoints))
    with pytest.raises(ValueError, match=message):
        Trainer(config, CPU, log=lambda _: None).resume()


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    train(TrainConfig(**{**SHORT, "steps": 5}, checkpoint_dir=str(tmp_path),
                      checkpoint_every=1, keep_last=2), CPU, log=lambda _: None)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000005", "step-00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_background_save_is_raised_not_dropped(tmp_path, monkeypatch):
    """A save that fails in the background thread stops the run at the next wait (the next
    save or the end) with a CheckpointError naming the step; the checkpoint it was writing
    is never marked complete."""
    def broken(path):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint, "file_crc32", broken)
    config = TrainConfig(**{**SHORT, "steps": 4}, checkpoint_dir=str(tmp_path),
                         checkpoint_every=2, async_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"saving step 2 .* in the background: .*disk "
                                              r"on fire"):
        train(config, CPU, log=lambda _: None)
    assert not checkpoint_dirs(tmp_path) and not (tmp_path / "latest").exists()


def test_inspect_says_what_a_checkpoint_holds_and_whether_it_is_intact(two_checkpoints,
                                                                       tmp_path, capsys):
    assert eurocore_main(["checkpoint", "inspect", str(two_checkpoints)]) == 0
    out = capsys.readouterr().out
    assert "step-00000004: complete and intact" in out and "step: 4 (16 samples" in out
    assert "tp 1, pp 1" in out and "hidden_size 64" in out and "torch " in out
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    _flip(directory / "step-00000002" / "__0_0.distcp")
    assert eurocore_main(["checkpoint", "inspect", str(directory / "step-00000002")]) == 1
    assert "__0_0.distcp' is corrupted" in capsys.readouterr().err


def test_resume_takes_a_runs_checkpoint_directory_and_ignores_newer_leftovers(
        two_checkpoints, tmp_path):
    """--resume DIR takes the checkpoint DIR's latest names. A run sent back to step 2
    saves step 3 as latest: the left-over step 4 (of the abandoned run) is neither resumed
    from nor counted by keep_last, which deletes step 2 only."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    assert _resume_in(tmp_path, resume=str(directory))[0].step == 4
    lines: list[str] = []
    Trainer(TrainConfig(**{**SHORT, "steps": 9}, checkpoint_dir=str(directory)), CPU,
            log=lines.append).resume()
    assert "resume: the learning-rate schedule is this run's, not the saved run's (steps 4 " \
           "-> 9)" in lines
    config = TrainConfig(**{**SHORT, "steps": 3}, checkpoint_dir=str(directory), keep_last=1,
                         resume=str(directory / "step-00000002"))
    train(config, CPU, log=lambda _: None)
    assert [p.name for p in checkpoint_dirs(directory)] == ["step-00000004", "step-00000003"]
    trainer, _ = _resume_in(directory)
    assert trainer.step == 3


def _stopped_by_sigusr1(config: TrainConfig, at_step: int) -> tuple[Preempted, list[str]]:
    """Runs ``config`` with the command line's signal handler installed; a real SIGUSR1
    arrives during step ``at_step``."""
    stop = StopSignals().install()
    lines: list[str] = []

    def on_step(metrics: dict) -> None:
        if metrics["step"] == at_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    try:
        with pytest.raises(Preempted) as stopped:
            train(config, CPU, log=lines.append, on_step=on_step, stop=stop)
    finally:
        stop.uninstall()
    return stopped.value, lines


def test_sigusr1_with_async_saves_stops_after_a_complete_checkpoint(tmp_path):
    """The shipped configs' path: SIGUSR1 during step 2 of a run saving in the background;
    the checkpoint of step 3 is complete when the run stops, and a resume from it takes
    steps 3-5 as the uninterrupted run does."""
    config = TrainConfig(**SHORT, checkpoint_dir=str(tmp_path), async_checkpoint=True,
                         checkpoint_every=100)
    stopped, lines = _stopped_by_sigusr1(config, at_step=2)
    assert stopped.saved and stopped.signal_name == "SIGUSR1" and stopped.step == 3
    assert "SIGUSR1 received: saving a checkpoint and stopping" in lines
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003"]
    resumed = train(config, CPU, log=lambda _: None)
    straight = train(TrainConfig(**SHORT), CPU, log=lambda _: None)
    assert [(m["loss"], m["grad_norm"]) for m in resumed] == \
           [(m["loss"], m["grad_norm"]) for m in straight[3:]]


def test_a_stop_signal_with_checkpoints_off_claims_no_checkpoint(tmp_path):
    config = TrainConfig(**SHORT, checkpoint_dir=str(tmp_path), checkpoint_every=0)
    stopped, lines = _stopped_by_sigusr1(config, at_step=1)
    assert not stopped.saved and "nothing saved (checkpoint_every = 0)" in str(stopped)
    assert "SIGUSR1 received: stopping (checkpoints are off)" in lines
    assert not checkpoint_dirs(tmp_path)


def _one_rank_cannot_hash(rank: int, world: int, directory: str) -> None:
    """Rank 1's CRC-32 of its file fails: both ranks raise, neither waits for the other."""
    if rank == 1:
        def broken(path):
            raise OSError("disk on fire")

        checkpoint.file_crc32 = broken
    trainer = Trainer(TrainConfig(**SHORT, checkpoint_dir=directory), _process(rank, world),
                      log=lambda _: None)
    with pytest.raises(CheckpointError, match=r"hashing the files of step 0 failed: rank 1: "
                                              r"disk on fire"):
        trainer.save_checkpoint()
    trainer.checkpointer.close()
    # what one rank alone knows (a signal, its background save failed) every rank learns
    stop = StopSignals()
    assert stop.agreed(failed=rank == 1) == (None, True)
    stop.received = "SIGUSR1" if rank == 0 else None
    assert stop.agreed() == ("SIGUSR1", False)


def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path):
    run_on_ranks(_one_rank_cannot_hash, 2, str(tmp_path))
    assert not checkpoint_dirs(tmp_path) and not (tmp_path / "latest").exists()
