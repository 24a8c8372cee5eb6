"""Checkpoints: sharded with torch.distributed.checkpoint (DCP), readable by any layout,
atomic, verified, optionally written in the background.

A checkpoint directory::

    CHECKPOINT_DIR/
        step-00000120/          a complete checkpoint
            .metadata           DCP's index: each tensor's global shape and stored chunks
            __0_0.distcp ...    the shards each rank wrote (DCP's files)
            eurocore.json       step, configs, layout, versions, data identity, and every
                                file's size and CRC-32 (written last: its presence and the
                                directory's name mark the checkpoint complete)
        step-00000240.tmp/      a save under way, or one a kill interrupted: never read;
                                removed when the next run starts
        latest                  the name of the newest complete checkpoint

What is stored is one canonical model whatever the layout that wrote it: every weight under
its layout-free name and full shape (``eurocore.model.WeightLayout``: fused q/k/v and
gate/up as their parts, the vocabulary without its padding), AdamW's two moments like
their weights, and each rank's random generator states. Each rank writes only the boxes of
those tensors it holds (its TP slice, its FSDP rows; replicated boxes once), and reads only
the boxes it needs in the layout it loads into: no rank gathers a model.

Saving: every rank writes into ``step-N.tmp/``, hashes the files it wrote, and rank 0
collects the sizes and checksums into ``eurocore.json``, fsyncs, renames the directory to
``step-N`` and replaces ``latest`` (both atomic renames). A kill at any moment leaves the
previous checkpoint and a ``latest`` naming a complete one. With ``async_save`` the
tensors are copied to host memory at the step boundary and written by DCP's background
thread while training goes on; at most one save is in flight, and its failure is raised at
the next save or at the end, never dropped.

Loading checks ``eurocore.json`` and every file's size and checksum first (the ranks share
the files); ``resume="auto"`` falls back to the newest intact checkpoint, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import platform
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from eurocore.model import WeightLayout
from eurocore.parallel import local_part
from eurocore.parallel.sharding import data_parallel_rows, restrict
from eurocore.utils.files import (
    fsync_path,
    read_json,
    write_json_atomically,
    write_text_atomically,
)

INFO_FILE = "eurocore.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CRC_BLOCK = 16 << 20
# The ModelConfig fields that give the tensors their shapes: a resume must keep them.
# Newer torch's async_save takes no_dist (and without it expects a process group even in
# one process); older ones have no such argument and find the missing group themselves.
_ASYNC_TAKES_NO_DIST = "no_dist" in inspect.signature(dcp.async_save).parameters
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "ffn_hidden_size", "tie_embeddings")


class CheckpointError(RuntimeError):
    """A save that failed (raised on every rank, at the save or at the next wait)."""


# -------------------------------------------------------------------------------------------
# The layout-free state: DCP's view of one rank's boxes of the full tensors
# -------------------------------------------------------------------------------------------


class TensorBox(torch.Tensor):
    """One rank's box of a full tensor, as DCP sees it: a tensor of the full shape (as a
    DTensor is) that holds only ``local``, the full tensor's elements from ``offsets`` on.
    DCP reaches the box through the checkpoint hooks its own DTensor uses, so the boxes of
    one tensor in any layout read each other's stored chunks (resharding): saving writes
    ``local``, loading fills it in place. Nothing computes on a box itself.
    """

    local: torch.Tensor
    offsets: tuple[int, ...]

    @staticmethod
    def __new__(cls, local: torch.Tensor, full_shape: tuple[int, ...],
                offsets: tuple[int, ...]) -> TensorBox:
        box = torch.Tensor._make_wrapper_subclass(cls, tuple(full_shape), dtype=local.dtype,
                                                  device=local.device)
        box.local, box.offsets = local, tuple(offsets)
        return box

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"TensorBox: {func} on a box of a full tensor; use its .local")

    def __repr__(self) -> str:
        return (f"TensorBox(full {tuple(self.shape)}, at {self.offsets}, local "
                f"{tuple(self.local.shape)} {self.dtype})")

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.size())

    def __create_write_items__(self, fqn: str, _: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(self.offsets)),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=self._chunk(),
                              properties=TensorProperties.create_from_tensor(self.local),
                              size=self.shape))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local

    def staged(self, buffer: torch.Tensor) -> TensorBox:
        """This box over a copy of ``local`` in ``buffer`` (host memory of its shape and
        dtype; pinned for a GPU tensor, whose copy is then asynchronous), for a save that
        runs while training changes the original."""
        buffer.copy_(self.local, non_blocking=buffer.is_pinned())
        return TensorBox(buffer, tuple(self.shape), self.offsets)


def layout_free_tensors(chunks: list[torch.nn.Module],
                        optimizer: torch.optim.Optimizer | None = None) -> dict[str, TensorBox]:
    """``model.<name>`` and ``optimizer.<name>.exp_avg`` / ``.exp_avg_sq`` -> this rank's
    box of each full tensor: views of the parameters and of AdamW's state, which must
    exist (:func:`init_optimizer_state`); without ``optimizer``, the parameters only.

    The last pipeline stage's copy of a tied embedding is a box of ``embedding.weight``
    like the first stage's original: the two are equal bit for bit (their gradients are
    summed before each step), so DCP writes one of them (its de-duplication of equal
    boxes) and loading fills both."""
    tensors: dict[str, TensorBox] = {}
    for chunk in chunks:
        layouts: list[WeightLayout] = chunk.weight_layouts()
        for layout in layouts:
            rows = data_parallel_rows(layout.param)
            sources = {"model.{}": layout.param}
            if optimizer is not None:
                state = optimizer.state[layout.param]
                sources.update({"optimizer.{}.exp_avg": state["exp_avg"],
                                "optimizer.{}.exp_avg_sq": state["exp_avg_sq"]})
            for name, full in layout.slices:
                for piece in restrict([full], rows):
                    box = slice(piece.rows.start, piece.rows.stop)
                    for pattern, tensor in sources.items():
                        key = pattern.format(name)
                        if key in tensors:
                            raise RuntimeError(f"{key}: two boxes on one rank")
                        tensors[key] = TensorBox(local_part(tensor).detach()[box],
                                                 piece.full_shape, piece.offsets)
    return tensors


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates AdamW's state (zero moments, step 0) where it does not exist yet, exactly as
    the first real step would: one step with zero gradients and a zero learning rate, which
    leaves every parameter unchanged (x · (1 - 0·wd) = x, x - 0 · 0/(√0 + eps) = x), then
    the step counts back to 0. Only between steps (gradients None)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    if any(p.grad is not None for p in params):
        raise RuntimeError("optimizer: its state is made between steps, without gradients")
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    for p in params:
        optimizer.state[p]["step"].zero_()


def set_optimizer_steps(optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Sets every parameter's AdamW step count (its bias correction) to ``steps``."""
    for state in optimizer.state.values():
        state["step"].fill_(steps)


def rng_tensors(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's random generator states (CPU, and the GPU's), under names of its own."""
    states = {f"rng.rank{rank}.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states[f"rng.rank{rank}.cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    torch.set_rng_state(states[f"rng.rank{rank}.cpu"])
    if device.type == "cuda" and f"rng.rank{rank}.cuda" in states:
        torch.cuda.set_rng_state(states[f"rng.rank{rank}.cuda"], device)


def versions() -> dict[str, str | None]:
    """The software that wrote a checkpoint."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from eurocore import __version__
    return {"eurocore": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


# -------------------------------------------------------------------------------------------
# Files: names, verification, inspection
# -------------------------------------------------------------------------------------------


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def checkpoint_dirs(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory`` (the directories named ``step-N``), newest first;
    nothing is checked (see :func:`verify`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint's eurocore.json; ValueError naming the file when it is missing or not
    what a checkpoint writes."""
    file = Path(path) / INFO_FILE
    info = read_json(file, "checkpoint", f"{str(path)!r} is not a complete checkpoint")
    keys = ("format", "step", "files", "meta")
    if not isinstance(info, dict) or any(k not in info for k in keys):
        raise ValueError(f"checkpoint: {str(file)!r} lacks {[k for k in keys if k not in info]}")
    if info["format"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {str(file)!r} has format {info['format']}; this "
                         f"eurocore reads format {FORMAT_VERSION}")
    return info


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def check_files(path: Path, files: dict[str, dict[str, int]], names: list[str]) -> str | None:
    """The first problem with the files ``names`` of checkpoint ``path`` against their
    recorded ``files`` entries (missing, another size, another CRC-32), None if none."""
    for name in names:
        file, want = path / name, files[name]
        if not file.is_file():
            return f"{str(file)!r} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{str(file)!r} has {size} bytes, {want['size']} were written"
        if file_crc32(file) != want["crc32"]:
            return f"{str(file)!r} is corrupted (its CRC-32 differs from the one recorded)"
    return None


def verify(path: str | Path, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """The checkpoint's info after checking it whole: eurocore.json, and every file's
    presence, size and CRC-32 (each rank of ``group`` reads a share of the files; all
    agree). Raises ValueError naming the first bad file."""
    path = Path(path)
    problem, info = None, None
    try:
        info = read_info(path)
    except ValueError as err:
        problem = str(err).removeprefix("checkpoint: ")
    rank, world = _rank_world(group)
    if info is not None:
        names = sorted(info["files"])[rank::world]
        problem = check_files(path, info["files"], names)
    problems = _all_gather(problem, group)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ValueError(f"checkpoint: {first}")
    return info


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint (it has eurocore.json, or is named like
    one), else the checkpoint its ``latest`` file names (a run's checkpoint directory).
    Raises ValueError naming the path when it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint: {str(path)!r} is not a directory")
    if (path / INFO_FILE).exists() or _STEP_DIR.match(path.name) or not (path / LATEST).exists():
        return path
    name = (path / LATEST).read_text(encoding="utf-8").strip()
    return path / name


def describe(path: str | Path) -> str:
    """What ``eurocore checkpoint inspect`` prints: step, layout, model, size, versions, and
    whether the checkpoint is complete and intact (ValueError if it is not)."""
    path = Path(path)
    info = verify(path)
    meta = info["meta"]
    layout = meta["layout"]
    model = meta["model_config"]
    size = sum(f["size"] for f in info["files"].values())
    lines = [
        f"checkpoint {path}: complete and intact ({len(info['files'])} files, "
        f"{size / 2**20:.1f} MiB; every size and CRC-32 checked)",
        f"step: {info['step']} ({meta['consumed_samples']:,} samples consumed)",
        "layout: " + ", ".join(f"{k} {v}" for k, v in layout.items()),
        "model: " + ", ".join(f"{k} {v}" for k, v in model.items()),
        f"data: {meta['data'].get('source')}",
        f"saved: {info.get('saved_at')} by " + ", ".join(
            f"{k} {v}" for k, v in info.get("versions", {}).items()),
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# The checkpointer of a run
# -------------------------------------------------------------------------------------------


class _StagingWriter(FileSystemWriter):
    """DCP's file writer whose staging (what async_save does before returning) copies each
    :class:`TensorBox` and tensor into host buffers kept in ``buffers`` from one save to the
    next (pinned for GPU tensors: allocating gigabytes of pinned memory takes long)."""

    buffers: dict[str, torch.Tensor]

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu",
                                 pin_memory=like.is_cuda)
            self.buffers[name] = buffer
        return buffer

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        staged = {}
        for name, value in state_dict.items():
            if isinstance(value, TensorBox):
                staged[name] = value.staged(self._buffer(name, value.local))
            else:
                staged[name] = self._buffer(name, value).copy_(value.detach())
        if any(isinstance(v, TensorBox) and v.local.is_cuda for v in state_dict.values()):
            torch.cuda.synchronize()
        return staged


class Checkpointer:
    """Saves a run's checkpoints into ``directory`` and finds the one to resume from.

    Args:
        directory: the run's checkpoint directory (created when first needed).
        keep_last: complete checkpoints kept (older ones are deleted once a newer one is
            complete); 0 keeps all.
        async_save: write in DCP's background thread (see the module docstring).
        log: where rank 0 says what happened (other ranks say nothing).

    Collective: every rank of the run makes one, in the same order, and calls each method
    alike. It makes its own gloo group for DCP's messages, so a background save never
    shares a communicator with training (and works beside NCCL).
    """

    def __init__(self, directory: str | Path, *, keep_last: int = 3, async_save: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.directory = Path(directory)
        self.keep_last, self.async_save = keep_last, async_save
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.rank, self.world = _rank_world(self.group)
        self._log = log if self.rank == 0 else (lambda _: None)
        self._pending: Future | None = None
        self._staging: dict[str, torch.Tensor] = {}  # async saves' host copies, reused
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") \
            if async_save else None

    # --- saving ----------------------------------------------------------------------------

    def save(self, tensors: dict[str, Any], meta: dict[str, Any], step: int) -> float:
        """Saves ``tensors`` (DCP's state: :class:`TensorBox` es and plain tensors) and
        ``meta`` (JSON) as the checkpoint of ``step``; returns the seconds training waited
        (the whole save, or with ``async_save`` the previous save's end and the copy to host
        memory). Raises CheckpointError when this save or the previous one failed."""
        start = time.perf_counter()
        self.wait()
        tmp = step_dir(self.directory, step).with_suffix(".tmp")

        def make_tmp() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        self._on_rank0_agreed(make_tmp, f"saving step {step} into {str(tmp)!r}")
        writer = _StagingWriter(str(tmp), sync_files=True)
        writer.buffers = self._staging  # free: the previous save is over (wait above)
        try:
            if self._executor is None:
                with quiet_without_process_group():
                    dcp.save(tensors, storage_writer=writer, process_group=self.group,
                             no_dist=self.group is None)
                self._finish(tmp, meta, step)
                return time.perf_counter() - start
            with quiet_without_process_group():
                written = dcp.async_save(tensors, storage_writer=writer,
                                         process_group=self.group,
                                         **({"no_dist": self.group is None}
                                            if _ASYNC_TAKES_NO_DIST else {}))
        except Exception as err:
            raise CheckpointError(f"checkpoint: saving step {step} into {str(tmp)!r} failed: "
                                  f"{err}") from err
        self._pending = self._executor.submit(self._finish_after, written, tmp, meta, step)
        return time.perf_counter() - start

    def failed(self) -> bool:
        """Whether the save in flight has ended in a failure (:meth:`wait` raises it)."""
        pending = self._pending
        return pending is not None and pending.done() and pending.exception() is not None

    def wait(self) -> None:
        """Waits for the save in flight, if any; raises CheckpointError if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Waits for the save in flight (raising its failure) and stops the writer thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()

    def _finish_after(self, written: Future, tmp: Path, meta: dict[str, Any],
                      step: int) -> None:
        try:
            written.result()
            self._finish(tmp, meta, step)
        except Exception as err:
            raise CheckpointError(f"checkpoint: saving step {step} into {str(tmp)!r} failed "
                                  f"in the background: {err}") from err

    def _finish(self, tmp: Path, meta: dict[str, Any], step: int) -> None:
        """After DCP wrote ``tmp``: each rank hashes its files, rank 0 records them, renames
        ``tmp`` to its final name and points ``latest`` at it; then keep_last."""
        try:
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            mine = [n for n in files if n.startswith(f"__{self.rank}_")]
            if self.rank == 0:  # and whatever no rank's prefix claims (DCP's .metadata)
                mine += [n for n in files if not re.match(r"^__\d+_", n)]
            hashed = {n: {"size": (tmp / n).stat().st_size, "crc32": file_crc32(tmp / n)}
                      for n in mine}
        except OSError as err:  # said to every rank below, so that none waits for this one
            hashed = f"rank {self.rank}: {err}"
        gathered = _all_gather(hashed, self.group)
        failed = [part for part in gathered if isinstance(part, str)]
        if failed:
            raise CheckpointError(f"checkpoint: hashing the files of step {step} failed: "
                                  f"{'; '.join(failed)}")

        def commit() -> None:
            recorded = {name: entry for part in gathered for name, entry in part.items()}
            info = {"format": FORMAT_VERSION, "step": step,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions(), "files": dict(sorted(recorded.items())),
                    "meta": meta}
            write_json_atomically(info, tmp / INFO_FILE, durable=True)
            final = step_dir(self.directory, step)
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                _remove(final)
            tmp.rename(final)
            fsync_path(self.directory)
            write_text_atomically(final.name + "\n", self.directory / LATEST, durable=True)
            self._log(f"checkpoint: step {step} saved in {final} "
                      f"({sum(e['size'] for e in recorded.values()) / 2**20:.1f} MiB)")
            self._apply_keep_last(keep=final)

        self._on_rank0_agreed(commit, f"completing step {step} in {str(tmp)!r}")

    def _apply_keep_last(self, keep: Path) -> None:
        if self.keep_last == 0:
            return
        # newer ones are left from a run that went back to an older checkpoint: they are
        # replaced as this run reaches their steps, and neither count nor go before then
        kept_and_older = [p for p in checkpoint_dirs(self.directory) if p.name <= keep.name]
        for old in kept_and_older[self.keep_last:]:
            _remove(old)

    # --- finding and loading ---------------------------------------------------------------

    def remove_interrupted(self) -> None:
        """Removes the ``.tmp`` directories of saves a kill interrupted (rank 0), saying so."""
        if self.rank == 0 and self.directory.is_dir():
            for stale in sorted(self.directory.glob("step-*.tmp")):
                self._log(f"checkpoint: removing {stale.name}, a save that did not finish")
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    def find(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its verified info, or None: ``resume`` is
        "none", "auto" (the one ``latest`` names, else the newest intact one, saying why it
        skips any; None if there is none) or a checkpoint directory (ValueError naming it
        when it is damaged)."""
        if resume == "none":
            return None
        if resume != "auto":
            try:
                path = resolve_checkpoint(resume)
                return path, verify(path, self.group)
            except ValueError as err:
                raise ValueError(f"resume: {err}") from None
        candidates = checkpoint_dirs(self.directory)
        latest = self._latest()
        if latest is not None and latest in candidates:
            # latest first, then older ones: a newer one is left from a run that went back
            # to an older checkpoint (or a crash before latest moved), not to be taken
            candidates = [p for p in candidates if p.name <= latest.name]
        elif latest is not None:
            self._log(f"checkpoint: {str(self.directory / LATEST)!r} names {latest.name}, "
                      f"which is not there; taking the newest intact checkpoint")
        problems = []
        for path in candidates:
            try:
                info = verify(path, self.group)
            except ValueError as err:
                problems.append(str(err).removeprefix("checkpoint: "))
                self._log(f"checkpoint: skipping {path.name}: {problems[-1]}")
                continue
            if problems:
                self._log(f"checkpoint: resuming from {path.name}, the newest intact one")
            return path, info
        if problems:  # starting afresh would bury a run that has checkpoints
            raise ValueError(f"resume: no checkpoint in {str(self.directory)!r} is intact "
                             f"({'; '.join(problems)}); --resume none starts afresh")
        return None

    def _latest(self) -> Path | None:
        file = self.directory / LATEST
        try:
            name = file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            if checkpoint_dirs(self.directory):
                self._log(f"checkpoint: {str(file)!r} is missing; taking the newest "
                          f"intact checkpoint")
            return None
        return self.directory / name if _STEP_DIR.match(name) else None

    def load(self, path: Path, tensors: dict[str, Any]) -> None:
        """Fills ``tensors`` (this rank's boxes and RNG states; each read from wherever the
        saving layout put it) from the checkpoint at ``path``."""
        with quiet_without_process_group():
            dcp.load(tensors, storage_reader=FileSystemReader(str(path)),
                     process_group=self.group, no_dist=self.group is None)

    def stored_names(self, path: Path) -> set[str]:
        """The names of the tensors a checkpoint holds."""
        return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)

    def _on_rank0_agreed(self, work: Callable[[], None], what: str) -> None:
        """Runs ``work`` on rank 0 and tells every rank how it went (in place of a barrier):
        a failure raises CheckpointError on all of them, so none waits for rank 0."""
        error = None
        if self.rank == 0:
            try:
                work()
            except Exception as err:  # any failure: the other ranks must hear of it
                error = f"{type(err).__name__}: {err}"
        if self.group is not None:
            shared = [error]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(self.group, 0),
                                       group=self.group)
            error = shared[0]
        if error is not None:
            raise CheckpointError(f"checkpoint: {what} failed on rank 0: {error}")

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def check_resumable(saved: dict[str, Any], model_config: Any, batch_size: int) -> None:
    """Raises ValueError naming the field when a run cannot take a checkpoint's state: a
    model of another shape, or another global batch (the data position is a step count)."""
    ours = dataclasses.asdict(model_config)
    for name in SHAPE_FIELDS:
        if saved["model_config"].get(name) != ours[name]:
            raise ValueError(f"{name}: the checkpoint's model has {name} = "
                             f"{saved['model_config'].get(name)}, this run's {ours[name]}")
    if saved["config"]["batch_size"] != batch_size:
        raise ValueError(f"batch_size: the checkpoint's run took {saved['config']['batch_size']}"
                         f" sequences per step, this one {batch_size}; its data position "
                         f"counts steps of that size")


def _remove(path: Path) -> None:
    """Deletes a checkpoint so that no moment shows a damaged one under its name: renamed
    to a .tmp (which the next start removes) before its files go."""
    doomed = path.with_name(path.name + ".deleting.tmp")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def quiet_without_process_group() -> Iterator[None]:
    """Without a process group DCP warns at every call that it assumes one process: it is
    the case, and the run's layout line says so once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered
