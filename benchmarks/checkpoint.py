"""The checkpoint benchmark: ``python -m eurocore.benchmarks.checkpoint``.

    python -m eurocore.benchmarks.checkpoint [--model 100m] [--save-layout dp2]
        [--load-layout tp2] [--saves 3] [--steps-between 3] [--quick] [--out DIR]
        [--workdir DIR] [--keep]

What a run's checkpoints cost, through the trainer's own path (``Trainer.state_dict`` into
``eurocore.train.checkpoint.Checkpointer``, DCP underneath): the ranks of ``--save-layout``
(spawned: gloo on the CPU, NCCL on GPUs, one per GPU) each build the model and AdamW of
``--model``, train, and then:

the file system
    First, its ceilings for one stream under ``--workdir``: a file (1 GiB; 4 GiB on GPUs)
    written in 16 MiB blocks and fsynced, then read back from a cold page cache.
save, sync
    ``--saves`` saves, ``--steps-between`` training steps apart; per save, what training
    waited: the whole save (state dict, DCP's write with fsync, every rank's CRC-32 of its
    files, the rename and ``latest``; keep_last 1, so an older checkpoint is deleted too).
    Each rank's write rate: the bytes of its own files over that time (GB/s per rank).
save, async
    The same with ``async_checkpoint``: what training waited per save is the state dict,
    the copy of every shard to host memory (pinned on GPUs) and the previous save's end.
    Also the time the steps between saves took, against the same steps without a save in
    flight: the background writer's cost to training (on a CPU it takes cores from the
    step). Goal: the wait below 10% of the synchronous save's.
load
    The checkpoint the sync saves left, into the same layout: the verification (every
    file's size and CRC-32, shared out over the ranks) and DCP's load, each timed alone
    from a cold page cache (the files, written with fsync, are dropped from it with
    ``posix_fadvise(DONTNEED)`` first). Read rate: the bytes of the rank's own shards
    over the load time (GB/s per rank).
reshard load
    The same checkpoint into ``--load-layout`` (other ranks, other shards: each reads the
    parts of stored chunks its boxes overlap), timed as above.

Timings are medians over the saves and the largest over the ranks (the step waits for its
slowest rank); rates are per rank, the lowest and the median. JSON:
``<out>/<date>-<device-slug>-checkpoint.json``, written after each part. Disk: two
checkpoints of the model (weights and two AdamW moments, fp32: 12 bytes per parameter) at a
time under ``--workdir``, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eurocore.model.config import PRESETS, preset
from eurocore.train import checkpoint
from eurocore.train.checkpoint import Checkpointer, TensorBox
from eurocore.train.distributed import init_process, shutdown
from eurocore.train.trainer import TrainConfig, Trainer
from eurocore.utils.files import check_writable_dir, write_json_atomically

from . import harness

SCHEMA_VERSION = 1
DEFAULT_OUT = "benchmarks/results"
GOAL_ASYNC_FRACTION = 0.10  # the async wait per save, as a fraction of the sync save
BYTES_PER_PARAMETER = 12    # fp32 weight and two AdamW moments: what a checkpoint holds
WARMUP_STEPS = 2            # AdamW's state exists and the first steps' one-off costs are paid

# The models: presets, and "100m", a ~100M-parameter Llama that a CPU trains in seconds a step.
MODELS: dict[str, dict[str, Any]] = {
    **{name: {"preset": name} for name in PRESETS},
    "100m": {"preset": "tiny", "model_overrides": {
        "vocab_size": 32000, "hidden_size": 768, "num_layers": 8, "num_heads": 12,
        "num_kv_heads": 4, "ffn_hidden_size": 2048, "max_seq_len": 2048}},
}
# Defaults by device, and --quick (tests the benchmark, not the disk).
CPU_DEFAULTS = {"model": "100m", "seq_len": 128, "saves": 3, "steps_between": 3,
                "disk_bytes": 1 << 30}
GPU_DEFAULTS = {"model": "llama-1b", "seq_len": 2048, "saves": 3, "steps_between": 5,
                "disk_bytes": 4 << 30}
QUICK = {"model": "tiny", "seq_len": 32, "saves": 2, "steps_between": 1,
         "disk_bytes": 16 << 20}

METHOD = {
    "save": "Trainer.state_dict + Checkpointer.save (keep_last 1) after the training steps; "
            "waited: the time until save returns, median over saves, largest over ranks",
    "rate": "bytes of the rank's own files (save) or shards (load) over the time; all "
            "ranks: their bytes over the slowest rank's time",
    "disk": "one stream: 16 MiB writes + fsync, then a cold read, of one file",
    "steps_between": "the training steps after each save (a background save may be in "
                     "flight), against the same steps with no save",
    "load": "verify (sizes, CRC-32) and DCP load, each from a cold page cache "
            "(posix_fadvise DONTNEED of the fsynced files)",
}
_LAYOUT_PART = re.compile(r"(tp|pp|dp|v)(\d+)|sp")


def parse_layout(name: str) -> tuple[int, dict[str, Any]]:
    """``(world size, TrainConfig fields)`` of a layout name: "one" (one process), or
    degrees joined, e.g. "dp2", "tp2", "pp2v2" (two stages of two virtual stages each),
    "tp2pp2sp" (sequence parallelism), "dp2tp2". Raises ValueError naming the name."""
    if name == "one":
        return 1, {}
    parts = list(_LAYOUT_PART.finditer(name))
    if not parts or "".join(m.group(0) for m in parts) != name:
        raise ValueError(f"expected 'one' or degrees such as dp2, tp2, pp2v2, tp2pp2sp, got "
                         f"{name!r}")
    degrees = {"tp": 1, "pp": 1, "dp": 1, "v": 1}
    fields: dict[str, Any] = {}
    for m in parts:
        if m.group(0) == "sp":
            fields["sequence_parallel"] = True
            continue
        if int(m.group(2)) < 1:
            raise ValueError(f"{name!r}: degrees are at least 1")
        degrees[m.group(1)] = int(m.group(2))
    fields.update({k: v for k, v in (("tp", degrees["tp"]), ("pp", degrees["pp"]),
                                     ("vpp", degrees["v"])) if v > 1})
    return degrees["tp"] * degrees["pp"] * degrees["dp"], fields


def drop_page_cache(path: Path) -> bool:
    """Evicts the (clean: fsynced) pages of the files in ``path`` from the page cache, so
    the next read comes from the disk; False where the OS has no posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in path.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def measure_disk(directory: Path, nbytes: int) -> dict[str, float]:
    """The ceilings of ``directory``'s file system for one stream: ``nbytes`` written in
    16 MiB blocks and fsynced, then read back from a cold page cache (GB/s)."""
    path = directory / "disk-ceiling.bin"
    block = os.urandom(16 << 20)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, nbytes // len(block))):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    written = path.stat().st_size
    write_s = time.perf_counter() - start
    drop_page_cache(directory)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return {"bytes": written, "write_gb_per_s": written / write_s / 1e9,
            "read_gb_per_s": written / read_s / 1e9}


# --- the ranks --------------------------------------------------------------------------------


def _config(settings: dict[str, Any], layout: str, directory: Path) -> TrainConfig:
    _, fields = parse_layout(layout)
    return TrainConfig(**MODELS[settings["model"]], **fields, steps=1_000_000,
                       warmup_steps=1, batch_size=settings["batch_size"], micro_batch_size=1,
                       seq_len=settings["seq_len"], data_workers=0, eval_every=0,
                       checkpoint_dir=str(directory), keep_last=1)


def _steps(trainer: Trainer, count: int) -> float:
    """Seconds for ``count`` training steps, the device done with them."""
    start = time.perf_counter()
    for _ in range(count):
        result = trainer.train_step()
    result["loss"].item()
    return time.perf_counter() - start


def _timed_save(trainer: Trainer, checkpointer: Checkpointer) -> float:
    """Seconds training waits for one save: the state dict and the checkpointer's save."""
    start = time.perf_counter()
    state = trainer.state_dict()
    checkpointer.save(state["tensors"], state["meta"], trainer.step)
    return time.perf_counter() - start


def _shard_bytes(tensors: dict[str, Any]) -> int:
    """Bytes of this rank's boxes: what it reads to load."""
    return sum((t.local if isinstance(t, TensorBox) else t).nbytes for t in tensors.values())


def _own_file_bytes(path: Path, rank: int) -> int:
    """Bytes of the files rank ``rank`` wrote in checkpoint ``path`` (rank 0: DCP's metadata
    and eurocore.json too)."""
    files = checkpoint.read_info(path)["files"]
    return sum(entry["size"] for name, entry in files.items()
               if name.startswith(f"__{rank}_") or (rank == 0 and not re.match(r"__\d+_", name)))


def _cold(path: Path, rank: int, group: dist.ProcessGroup | None) -> bool:
    """Drops ``path`` from the page cache (rank 0; the others wait)."""
    dropped = drop_page_cache(path) if rank == 0 else True
    if group is not None:
        dist.barrier(group=group)
    return dropped


def _timed_load(trainer: Trainer, path: Path, same_layout: bool) -> dict[str, Any]:
    """Verification and load of ``path`` into ``trainer``, each from a cold page cache."""
    ckpt = trainer.checkpointer
    tensors = trainer.state_dict()["tensors"]
    if not same_layout:  # as Trainer.resume: another layout's generator states are not read
        tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    cold = _cold(path, ckpt.rank, ckpt.group)
    start = time.perf_counter()
    checkpoint.verify(path, ckpt.group)
    verify_s = time.perf_counter() - start
    _cold(path, ckpt.rank, ckpt.group)
    start = time.perf_counter()
    ckpt.load(path, tensors)
    if trainer.process.device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    return {"verify_s": verify_s, "load_s": load_s, "bytes": _shard_bytes(tensors),
            "cold_cache": cold}


def _save_rank(trainer: Trainer, settings: dict[str, Any], work: Path,
               log: harness.StageLog) -> dict[str, Any]:
    """Sync saves (the trainer's own checkpointer), async saves, then a load of the last
    sync save, each save followed by the steps that run while it may still be in flight."""
    rank, saves, between = trainer.process.rank, settings["saves"], settings["steps_between"]
    _steps(trainer, WARMUP_STEPS)
    result: dict[str, Any] = {"steps_between_s": _steps(trainer, between * saves) / saves}
    checkpointers = {"sync": trainer.checkpointer,
                     "async": Checkpointer(work / "async", keep_last=1, async_save=True,
                                           log=lambda _: None)}
    for mode, ckpt in checkpointers.items():
        waits, steps = [], []
        for i in range(saves):
            waits.append(_timed_save(trainer, ckpt))
            log(f"save {i + 1}/{saves}, {mode}: training waited {waits[-1] * 1e3:.0f} ms")
            steps.append(_steps(trainer, between))
        start = time.perf_counter()
        ckpt.wait()  # the last async save's end
        result[mode] = {"wait_s": waits, "steps_between_s": steps,
                        "drain_s": time.perf_counter() - start}
    checkpointers["async"].close()
    newest = checkpoint.checkpoint_dirs(work / "sync")[0]
    result["sync"]["bytes"] = _own_file_bytes(newest, rank)
    result["load"] = _timed_load(trainer, newest, same_layout=True)
    return result


def _worker(rank: int, world: int, port: int, device: str, settings: dict[str, Any],
            layout: str, part: str, work: str, out: str) -> None:
    """One rank: ``part`` is "save" (saves, then a load in the same layout) or "reshard"
    (a load of the sync checkpoint); its figures go to ``out/rank<r>.json``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    process = init_process(device)
    log = harness.StageLog() if rank == 0 else (lambda _: None)
    try:
        trainer = Trainer(_config(settings, layout, Path(work) / "sync"), process,
                          log=lambda _: None)
        if part == "save":
            result = _save_rank(trainer, settings, Path(work), log)
        else:
            result = {"load": _timed_load(
                trainer, checkpoint.checkpoint_dirs(Path(work) / "sync")[0],
                same_layout=False)}
        trainer.checkpointer.close()
    finally:
        shutdown()
    write_json_atomically(result, Path(out, f"rank{rank}.json"))


def run_ranks(world: int, device: str, settings: dict[str, Any], layout: str, part: str,
              work: Path) -> list[dict[str, Any]]:
    """Spawns the ``world`` ranks of ``layout`` for ``part``; their figures, by rank."""
    with tempfile.TemporaryDirectory(dir=work) as out:
        mp.spawn(_worker, args=(world, harness.free_port(), device, settings, layout, part,
                                str(work), out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


# --- figures ----------------------------------------------------------------------------------


def _rates(ranks: list[dict[str, Any]], key: str, seconds: list[float]) -> dict[str, float]:
    """Per rank, and all ranks together (their bytes over the slowest one's time)."""
    rates = [r[key] / s / 1e9 for r, s in zip(ranks, seconds, strict=True)]
    return {"gb_per_s_per_rank_min": min(rates),
            "gb_per_s_per_rank_median": statistics.median(rates),
            "gb_per_s_all_ranks": sum(r[key] for r in ranks) / max(seconds) / 1e9}


def summarize_saves(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sync and async rows from every rank's save figures."""
    baseline = max(r["steps_between_s"] for r in ranks)
    rows = []
    for mode in ("sync", "async"):
        waits = [statistics.median(r[mode]["wait_s"]) for r in ranks]
        steps = max(statistics.median(r[mode]["steps_between_s"]) for r in ranks)
        row = {"part": "save", "case": mode, "wait_ms": 1e3 * max(waits),
               "wait_ms_per_save": [1e3 * max(w) for w in
                                    zip(*(r[mode]["wait_s"] for r in ranks), strict=True)],
               "steps_between_ms": 1e3 * steps, "steps_between_ms_no_save": 1e3 * baseline,
               "step_slowdown_ms": 1e3 * (steps - baseline),
               "drain_ms": 1e3 * max(r[mode]["drain_s"] for r in ranks)}
        if mode == "sync":
            row["bytes_per_rank"] = [r["sync"]["bytes"] for r in ranks]
            row.update(_rates([r["sync"] for r in ranks], "bytes", waits))
        rows.append(row)
    sync, async_ = rows
    async_["fraction_of_sync"] = async_["wait_ms"] / sync["wait_ms"]
    async_["goal"] = f"< {GOAL_ASYNC_FRACTION:.0%} of the sync save"
    async_["goal_met"] = async_["fraction_of_sync"] < GOAL_ASYNC_FRACTION
    return rows


def summarize_load(ranks: list[dict[str, Any]], case: str) -> dict[str, Any]:
    """A load row from every rank's load figures."""
    loads = [r["load"] for r in ranks]
    return {"part": "load", "case": case,
            "verify_ms": 1e3 * max(x["verify_s"] for x in loads),
            "load_ms": 1e3 * max(x["load_s"] for x in loads),
            "bytes_per_rank": [x["bytes"] for x in loads],
            "cold_cache": all(x["cold_cache"] for x in loads),
            **_rates(loads, "bytes", [x["load_s"] for x in loads])}


def format_table(rows: Sequence[dict[str, Any]], disk: dict[str, float] | None = None) -> str:
    """The rows as a fixed-width table (and the disk's one-stream ceilings, if measured)."""
    lines = [f"{'part':<6} {'case':<24} {'waited ms':>10} {'GB/s/rank min':>14} "
             f"{'median':>8} {'all ranks':>10} {'verify ms':>10} {'note'}"]

    def number(row: dict[str, Any], key: str, spec: str) -> str:
        return "-" if row.get(key) is None else format(row[key], spec)

    for row in rows:
        waited = row.get("wait_ms", row.get("load_ms"))
        if row.get("goal_met") is not None:
            note = (f"{row['fraction_of_sync']:.1%} of sync (goal {row['goal']}: "
                    f"{'met' if row['goal_met'] else 'NOT met'}); steps between saves "
                    f"{row['step_slowdown_ms']:+.0f} ms")
        elif row["part"] == "save":
            note = f"{sum(row['bytes_per_rank']) / 1e9:.2f} GB in all"
        else:
            note = "cold page cache" if row["cold_cache"] else "page cache not dropped"
        lines.append(f"{row['part']:<6} {row['case']:<24} {waited:>10.0f} "
                     f"{number(row, 'gb_per_s_per_rank_min', '.2f'):>14} "
                     f"{number(row, 'gb_per_s_per_rank_median', '.2f'):>8} "
                     f"{number(row, 'gb_per_s_all_ranks', '.2f'):>10} "
                     f"{number(row, 'verify_ms', '.0f'):>10} {note}")
    if disk is not None:
        lines.append(f"the file system, one stream of {disk['bytes'] / 2**30:.1f} GiB: write "
                     f"+ fsync {disk['write_gb_per_s']:.2f} GB/s, cold read "
                     f"{disk['read_gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


def plot_title(env: dict[str, Any], settings: dict[str, Any]) -> str:
    """The title of :func:`plot`'s figure: device, model, layout, torch version."""
    return (f"{env['device_name']}: {settings['model']} checkpoints, "
            f"{settings['save_layout']}, torch {env['torch']}")


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars of what training waits per save (sync, async) and the load times, as PNG."""
    from .plot import pyplot, save_png

    plt = pyplot()
    labels = [f"{r['part']}\n{r['case']}" for r in rows]
    values = [r.get("wait_ms", r.get("load_ms")) / 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(labels, values, color=["#c44", "#4a4", "#48c", "#84c"][:len(rows)])
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds (training waits / load takes)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


# --- the command ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks.checkpoint",
        description="Times a run's checkpoints: save (sync, async), load, reshard load.")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="the model (default: 100m on the CPU, llama-1b on GPUs; "
                             "--quick: tiny)")
    parser.add_argument("--save-layout", default=None, metavar="LAYOUT",
                        help="layout that saves: 'one' or degrees such as dp2, tp2, pp2v2, "
                             "tp2pp2sp (default: dp over 2 CPU processes or every GPU)")
    parser.add_argument("--load-layout", default=None, metavar="LAYOUT",
                        help="layout that reshard-loads (default: tp of the same size; "
                             "'none' skips it)")
    parser.add_argument("--saves", type=int, default=None, help="saves timed per mode (default 3)")
    parser.add_argument("--steps-between", type=int, default=None,
                        help="training steps between saves (default: CPU 3, GPU 5)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: CPU 128, GPU 2048)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPUs where there are some")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model: seconds in all (tests the benchmark, not the disk)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON goes (default: {DEFAULT_OUT})")
    parser.add_argument("--plot", action="store_true",
                        help="also a PNG beside the JSON (needs matplotlib: the plot extra)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where the checkpoints go, in a fresh sub-directory removed at "
                             "the end (default: the system's temporary directory); put it on "
                             "the file system a run would use")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    return parser


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from the options, each checked (exit 2 naming the option)."""
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "cuda" and gpus == 0:
        parser.error("--device: 'cuda' asked for, but torch sees no GPU")
    device = "cuda" if gpus else "cpu"
    settings = dict(GPU_DEFAULTS if gpus else CPU_DEFAULTS)
    if args.quick:
        settings.update(QUICK)
    for key in ("model", "saves", "steps_between", "seq_len"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key, least in (("saves", 1), ("steps_between", 1), ("seq_len", 2)):
        if settings[key] < least:
            parser.error(f"--{key.replace('_', '-')}: at least {least}, got {settings[key]}")
    width = 2 if device == "cpu" else gpus
    default_save = f"dp{width}" if width > 1 else "one"
    default_load = f"tp{width}" if width > 1 else "none"
    layouts = {}
    for option, value in (("--save-layout", args.save_layout or default_save),
                          ("--load-layout", args.load_layout or default_load)):
        if value == "none" and option == "--load-layout":
            layouts[option] = None
            continue
        try:
            world, _ = parse_layout(value)
        except ValueError as err:
            parser.error(f"{option}: {err}")
        if device == "cuda" and world > gpus:
            parser.error(f"{option}: {value!r} needs {world} GPUs, this machine has {gpus}")
        layouts[option] = (value, world)
    worlds = [w for _, w in filter(None, layouts.values())]
    settings.update(device=device, save_layout=layouts["--save-layout"],
                    load_layout=layouts["--load-layout"],
                    batch_size=max(4, *worlds) if worlds else 4)
    model = preset(MODELS[settings["model"]]["preset"],
                   **MODELS[settings["model"]].get("model_overrides", {}))
    if settings["seq_len"] > model.max_seq_len:
        parser.error(f"--seq-len: at most the model's max_seq_len {model.max_seq_len}, got "
                     f"{settings['seq_len']}")
    for option, layout in (("--save-layout", settings["save_layout"]),
                           ("--load-layout", settings["load_layout"])):
        if layout is not None:  # the trainer's own checks of a layout, before any spawn
            try:
                _config(settings, layout[0], Path(".")).layout(layout[1])
            except ValueError as err:
                parser.error(f"{option}: {layout[0]!r}: {err}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the parts, prints the table and writes the JSON after each part."""
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(parser, args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot: matplotlib is not installed (pip install eurocore[plot])")
    try:
        check_writable_dir("--out", args.out)
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        check_writable_dir("--workdir", base)
    except ValueError as err:
        parser.error(str(err))
    env = harness.environment(settings["device"])
    print(harness.format_environment(env), flush=True)
    path = harness.result_path(env, args.out, "checkpoint")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="eurocore-ckptbench-", dir=base))
    log = harness.StageLog()
    save_layout, save_world = settings["save_layout"]
    payload: dict[str, Any] = {
        "benchmark": "checkpoint", "schema": SCHEMA_VERSION, "environment": env,
        "settings": {**settings, "save_layout": save_layout,
                     "load_layout": (settings["load_layout"] or [None])[0],
                     "workdir": str(base)},
        "method": METHOD,
        "rows": []}
    try:
        with log.stage("the file system's one-stream write and read rates"):
            payload["disk"] = measure_disk(work, settings["disk_bytes"])
        with log.stage(f"saves and a load, {save_layout} ({save_world} "
                       f"{settings['device']} process{'es' if save_world > 1 else ''})"):
            ranks = run_ranks(save_world, settings["device"], settings, save_layout, "save",
                              work)
        payload["rows"] = [*summarize_saves(ranks), summarize_load(ranks, f"{save_layout}, "
                                                                         f"same layout")]
        write_json_atomically(payload, path)
        if settings["load_layout"] is not None:
            load_layout, load_world = settings["load_layout"]
            with log.stage(f"reshard load into {load_layout}"):
                ranks = run_ranks(load_world, settings["device"], settings, load_layout,
                                  "reshard", work)
            payload["rows"].append(summarize_load(ranks, f"{save_layout} -> {load_layout}"))
            write_json_atomically(payload, path)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(payload["rows"], payload["disk"]))
    print(f"\nresults written to {path}")
    if args.plot:
        title = plot_title(env, payload["settings"])
        print(f"plot written to {plot(payload['rows'], path.with_suffix('.png'), title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
