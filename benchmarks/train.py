"""The one-GPU training benchmark: ``python -m eurocore.benchmarks.train``.

    python -m eurocore.benchmarks.train [--models llama-1b llama3-8b] [--seq-lens 2048 4096]
        [--recompute none full] [--steps 12] [--warmup 2] [--tokens-per-step 16384]
        [--quick] [--device auto|cpu|cuda] [--out DIR | --json PATH] [--deadline SECONDS]
        [--peak-tflops TFLOPS]

What a user's run achieves, timed through the trainer itself: each setting builds a
``eurocore.train.Trainer`` from a ``TrainConfig`` (one process, the synthetic Markov source
so no disk is read, bf16 autocast on GPUs, the kernels' auto backends) and trains
``--steps`` steps with every step logged; the first ``--warmup`` steps (Triton's compiles,
AdamW's state, the allocator's growth) are left out of the figures.

Settings on a GPU, in this order so that a run cut short has the most valuable ones:
every model without recomputation first, then every model with each other recompute
setting. The models: ``llama-1b`` (the preset, Llama-3.2-1B's shapes) at seq 2048 and 4096,
and ``llama3-8b`` at seq 4096 with its decoder layers cut to what fits this GPU
(:func:`fit_layers`). The recompute settings are those ``TrainConfig.recompute`` accepts
(its declared choices), so a new one is benchmarked without a change here. Each step holds
``--tokens-per-step`` tokens (default 16384: batch = 16384 / seq, one microbatch).

Per setting: step time (median and mean over the timed steps), tokens/s, TFLOP/s per device
(``ModelConfig.training_flops_per_token``: model FLOPs; recomputation is not counted),
MFU against the device's dense bf16 peak (``eurocore.train.metrics.device_peak``; null
where unknown, as on a CPU), the peak memory allocated and reserved (GPU), the first and
last losses and the setting's wall time (build and warm-up included).

JSON: ``<out>/<date>-<device>-train.json`` (or ``--json PATH``), rewritten atomically after
each setting with ``status`` "running", "complete" or "deadline". ``--deadline``: no setting
starts after that many seconds from the process's start (imports included), nor one that
would end after it were it as quick as the quickest so far (those are listed in
``not_run``).

On the CPU: the tiny preset at seq 32 and 64, 128 tokens per step; ``--quick`` runs 3 steps
(1 warm-up) per setting. That tests the benchmark, not the hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eurocore.model.config import PRESETS, ModelConfig, preset
from eurocore.model.memory import llama_analytic_bytes
from eurocore.train.config import TrainConfig, field_specs
from eurocore.train.distributed import Process, local_device
from eurocore.train.trainer import STATE_BYTES_PER_PARAMETER, Trainer
from eurocore.utils.files import write_json_atomically

from . import harness

SCHEMA_VERSION = 1
DEFAULT_OUT = "benchmarks/results"

# model -> its sequence lengths: the GPU's models (each with its layers cut to what fits the
# GPU, which leaves llama-1b whole), then the CPU's (tests the benchmark in seconds).
GPU_MODELS: dict[str, tuple[int, ...]] = {"llama-1b": (2048, 4096), "llama3-8b": (4096,)}
CPU_MODELS: dict[str, tuple[int, ...]] = {"tiny": (32, 64)}
# The sequence length of a model named with --models that has none above (at most its own).
DEFAULT_SEQ_LEN = 4096
GPU_TOKENS_PER_STEP = 16384
CPU_TOKENS_PER_STEP = 128
STEPS, WARMUP = 12, 2
QUICK_STEPS, QUICK_WARMUP = 3, 1  # --quick (meant for the CPU)

# What fit_layers counts, per parameter, besides the fp32 weight, gradient and AdamW moments
# (the trainer's STATE_BYTES_PER_PARAMETER): the bf16 copy autocast makes of each weight and
# keeps for the backward.
AUTOCAST_BYTES_PER_PARAMETER = 2
# Per logit (tokens x vocabulary): bf16 logits, their fp32 copy for the loss and its fp32
# gradient, with room to spare (the loss's own temporaries).
BYTES_PER_LOGIT = 12
# The share of the device's memory fit_layers plans to use: the allocator's fragmentation,
# cuBLAS workspaces and AdamW's foreach temporaries take the rest.
MEMORY_FRACTION = 0.7


@dataclass(frozen=True)
class Setting:
    """One timed training run: the model (a preset, its decoder layers possibly cut), the
    sequence length, the global batch (sequences per step) and the recompute setting."""

    model: str
    num_layers: int
    seq_len: int
    batch_size: int
    recompute: str
    layers_cut: bool = False  # num_layers is the preset's, cut to fit the device

    @property
    def name(self) -> str:
        cut = f" ({self.num_layers} layers)" if self.layers_cut else ""
        return f"{self.model}{cut} seq {self.seq_len} x {self.batch_size}, " \
               f"recompute {self.recompute}"


def recompute_choices() -> tuple[str, ...]:
    """The recompute settings ``TrainConfig`` declares (``--recompute``'s choices)."""
    return next(tuple(spec.choices or ()) for spec in field_specs() if spec.name == "recompute")


def activation_bytes_per_layer(config: ModelConfig, seq_len: int, batch_size: int) -> int:
    """Bytes one decoder layer keeps for its backward without recomputation, on the fused
    kernels' path: :func:`eurocore.model.memory.llama_analytic_bytes` (which the accounting
    benchmark checks against a measurement), one process."""
    return sum(llama_analytic_bytes(config, seq_len, batch_size, 1, False).values())


def fit_layers(config: ModelConfig, seq_len: int, batch_size: int, memory_bytes: int,
               fraction: float = MEMORY_FRACTION) -> int:
    """The most decoder layers of ``config`` (at most its own) whose training step without
    recomputation fits in ``fraction`` of ``memory_bytes``, one process: per parameter the
    trainer's state (fp32 weight, gradient, two AdamW moments) plus autocast's bf16 copy;
    per layer also its saved activations (:func:`activation_bytes_per_layer`); the logits
    of the step's tokens once. At least 1.
    """
    one = dataclasses.replace(config, num_layers=1)
    per_layer = dataclasses.replace(config, num_layers=2).num_parameters() \
        - one.num_parameters()
    fixed = one.num_parameters() - per_layer  # embeddings, head, the final norm
    per_parameter = STATE_BYTES_PER_PARAMETER + AUTOCAST_BYTES_PER_PARAMETER
    logits = BYTES_PER_LOGIT * seq_len * batch_size * config.vocab_size
    room = fraction * memory_bytes - fixed * per_parameter - logits
    layer = per_layer * per_parameter + activation_bytes_per_layer(config, seq_len, batch_size)
    return max(1, min(config.num_layers, int(room // layer)))


def plan(models: dict[str, tuple[int, ...]], recompute: Sequence[str], tokens_per_step: int,
         memory_bytes: int | None) -> list[Setting]:
    """The settings in the order they run: each recompute setting in turn (``recompute``'s
    order), every model (preset name -> sequence lengths) and sequence length under it.
    With ``memory_bytes`` (a GPU's), each model's layers are cut by :func:`fit_layers` to
    what fits in it; without, they stay whole."""
    settings = []
    for mode in recompute:
        for model, seq_lens in models.items():
            config = preset(model)
            for seq_len in seq_lens:
                batch = max(1, tokens_per_step // seq_len)
                layers = config.num_layers
                if memory_bytes is not None:
                    layers = fit_layers(config, seq_len, batch, memory_bytes)
                settings.append(Setting(model, layers, seq_len, batch, mode,
                                        layers_cut=layers < config.num_layers))
    return settings


def train_config(setting: Setting, steps: int, device: str, cpu: bool,
                 peak_tflops: float | None) -> TrainConfig:
    """The TrainConfig of ``setting``: synthetic data, every step logged, no validation and
    no checkpoints (neither is what is timed); on the CPU (``cpu``) batches are read in the
    training process (loader processes would take longer to start than the tiny run)."""
    return TrainConfig(
        preset=setting.model, num_layers=setting.num_layers, seq_len=setting.seq_len,
        batch_size=setting.batch_size, recompute=setting.recompute, steps=steps,
        log_every=1, eval_every=0, checkpoint_every=0, resume="none", device=device,
        peak_tflops=peak_tflops, **({"data_workers": 0} if cpu else {}))


def summarize(setting: Setting, trainer: Trainer, history: list[dict[str, Any]],
              warmup: int) -> dict[str, Any]:
    """The setting's figures from the trainer's per-step metrics (``history``, one per
    step): times over the steps after ``warmup``, memory peaks over all of them."""
    timed = history[warmup:] or history[-1:]
    step_ms = [m["step_ms"] for m in timed]
    mean_s = statistics.fmean(step_ms) / 1e3
    tokens_per_step = setting.batch_size * setting.seq_len
    tokens_per_s = tokens_per_step / mean_s
    tflops = tokens_per_s * trainer.flops_per_token / 1e12
    peak = trainer.peak_tflops

    def largest(key: str) -> float | None:
        values = [m[key] for m in history if m.get(key) is not None]
        return max(values) if values else None

    return {
        "model": setting.model, "num_layers": setting.num_layers,
        "layers_cut": setting.layers_cut,
        "parameters": trainer.model_config.num_parameters(),
        "seq_len": setting.seq_len, "batch_size": setting.batch_size,
        "tokens_per_step": tokens_per_step, "recompute": setting.recompute,
        "bf16": trainer.bf16, "steps": len(history), "timed_steps": len(timed),
        "step_ms_median": statistics.median(step_ms), "step_ms_mean": mean_s * 1e3,
        "step_ms": [round(ms, 3) for ms in step_ms],
        "tokens_per_s": tokens_per_s, "flops_per_token": trainer.flops_per_token,
        "tflops_per_device": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak is not None else None,
        "max_allocated_gib": largest("max_allocated_gib"),
        "max_reserved_gib": largest("max_reserved_gib"),
        "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
    }


def run_setting(setting: Setting, config: TrainConfig, process: Process, warmup: int
                ) -> dict[str, Any]:
    """Trains ``config`` and returns its row (:func:`summarize`, status "ok"), or a row
    with status "failed" and the error's first line (out of memory, a kernel that does not
    compile, ...); the device's memory is freed either way."""
    trainer = None
    started = time.monotonic()
    try:
        trainer = Trainer(config, process, log=lambda line: print(f"    {line}", flush=True))
        history = trainer.train()
        row = {"setting": setting.name, "status": "ok",
               **summarize(setting, trainer, history, warmup)}
    except Exception as err:  # one setting's failure is a result; the others still run
        row = {"setting": setting.name, "status": "failed", "model": setting.model,
               "num_layers": setting.num_layers, "seq_len": setting.seq_len,
               "batch_size": setting.batch_size, "recompute": setting.recompute,
               "error": harness._first_line(err)}
    finally:
        del trainer  # the model, AdamW's state and the loader's processes go with it
        gc.collect()
        if process.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(process.device)
    row["seconds"] = time.monotonic() - started
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The settings' figures as a fixed-width table; failed settings say why."""
    header = (f"{'model':24} {'seq':>5} {'batch':>5} {'recompute':>9} {'step ms':>9} "
              f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'alloc GiB':>9} {'resv GiB':>8}")
    lines = [header, "-" * len(header)]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        model = r["model"] + (f" ({r['num_layers']} L)" if r.get("layers_cut") else "")
        if r["status"] != "ok":
            lines.append(f"{model:24} {r['seq_len']:>5} {r['batch_size']:>5} "
                         f"{r['recompute']:>9} failed: {r['error']}")
            continue
        lines.append(f"{model:24} {r['seq_len']:>5} {r['batch_size']:>5} {r['recompute']:>9} "
                     f"{r['step_ms_median']:>9.1f} {r['tokens_per_s']:>10,.0f} "
                     f"{r['tflops_per_device']:>8.2f} "
                     f"{number(None if r['mfu'] is None else 100 * r['mfu'], '.1f'):>6} "
                     f"{number(r['max_allocated_gib'], '.1f'):>9} "
                     f"{number(r['max_reserved_gib'], '.1f'):>8}")
    return "\n".join(lines)


METHOD = {
    "run": "eurocore.train.Trainer from a TrainConfig, one process, synthetic Markov data, "
           "bf16 autocast on GPUs, every step logged (its .item() waits for the device)",
    "times": "step_ms: the trainer's per-step wall time; the steps after the warm-up count; "
             "tokens_per_s = tokens per step / mean step time",
    "flops": "ModelConfig.training_flops_per_token (model FLOPs: every matmul and causal "
             "attention, x3 for the backward; recomputation not counted)",
    "mfu": "tflops_per_device / the device's dense bf16 peak (eurocore.train.metrics); "
           "null where the peak is unknown",
    "memory": "torch.cuda max_memory_allocated / max_memory_reserved over all steps",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks.train",
        description="Times training steps of Llama-shaped models on one device through the "
                    "trainer itself: tokens/s, TFLOP/s, MFU and peak memory per setting.")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(PRESETS),
                        metavar="PRESET",
                        help="presets to time, their layers cut to fit a GPU (default: "
                             "llama-1b and llama3-8b on a GPU, tiny on the CPU)")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, metavar="N",
                        help="sequence lengths for every model (default: each model's own)")
    parser.add_argument("--recompute", nargs="+", default=None, metavar="MODE",
                        help=f"recompute settings (default: all of "
                             f"{', '.join(recompute_choices())})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per setting (default {STEPS}; --quick {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"first steps of each setting left out of the figures (default "
                             f"{WARMUP}; --quick {QUICK_WARMUP})")
    parser.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                        help=f"tokens per step (default: GPU {GPU_TOKENS_PER_STEP}, CPU "
                             f"{CPU_TOKENS_PER_STEP})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per setting ({QUICK_WARMUP} warm-up): "
                             f"tests the benchmark")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU where there is one")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                        help="the device's peak for MFU (default: the trainer's table)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON goes (default: {DEFAULT_OUT})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the JSON to PATH instead of DIR/<date>-<device>-train.json")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="start no setting after this many seconds from the process's "
                             "start, nor one that would end after it")
    return parser


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace
             ) -> tuple[torch.device, list[Setting], int, int]:
    """(device, settings, steps, warm-up steps) from the options, each checked (exit 2
    naming the option)."""
    try:
        device = local_device(args.device, 0)
    except ValueError as err:
        parser.error(f"--{err}")
    gpu = device.type == "cuda"
    choices = recompute_choices()
    recompute = args.recompute or list(choices)
    unknown = [mode for mode in recompute if mode not in choices]
    if unknown:
        parser.error(f"--recompute: {unknown[0]!r} is not one of {', '.join(choices)}")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick
                                                          else WARMUP)
    if steps < 1:
        parser.error(f"--steps: at least 1, got {steps}")
    if not 0 <= warmup < steps:
        parser.error(f"--warmup: from 0 to --steps - 1 = {steps - 1}, got {warmup}")
    if args.deadline is not None and args.deadline <= 0:
        parser.error(f"--deadline: a number of seconds above 0, got {args.deadline:g}")
    tokens = args.tokens_per_step or (GPU_TOKENS_PER_STEP if gpu else CPU_TOKENS_PER_STEP)
    models = dict(GPU_MODELS if gpu else CPU_MODELS)
    if args.models:
        models = {m: models.get(m, (min(DEFAULT_SEQ_LEN, preset(m).max_seq_len),))
                  for m in args.models}
    if args.seq_lens:
        models = dict.fromkeys(models, tuple(args.seq_lens))
    for model, seq_lens in models.items():
        for seq_len in seq_lens:
            if not 2 <= seq_len <= preset(model).max_seq_len:
                parser.error(f"--seq-lens: {model}'s sequences take 2 to "
                             f"{preset(model).max_seq_len} tokens, got {seq_len}")
            if tokens < seq_len:
                parser.error(f"--tokens-per-step: {tokens} is less than one sequence of "
                             f"{seq_len} tokens")
    memory = torch.cuda.get_device_properties(device).total_memory if gpu else None
    return device, plan(models, recompute, tokens, memory), steps, warmup


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the settings in turn, writing the JSON after each; prints the table. Exit
    status 1 when a setting failed, else 0 (settings left out at the deadline included)."""
    started = time.monotonic()
    parser = _parser()
    args = parser.parse_args(argv)
    device, settings, steps, warmup = _options(parser, args)
    harness.check_output(parser, args)
    deadline = harness.deadline_after(args.deadline)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    process = Process(rank=0, world_size=1, local_rank=0, device=device)
    env = harness.environment(device)
    print(harness.format_environment(env), flush=True)
    path = Path(args.json) if args.json else harness.result_path(env, args.out, "train")
    payload: dict[str, Any] = {
        "benchmark": "train", "schema": SCHEMA_VERSION, "status": "running",
        "environment": env, "method": METHOD,
        "options": {"steps": steps, "warmup": warmup, "quick": args.quick,
                    "deadline_s": args.deadline},
        "settings": [dataclasses.asdict(s) | {"name": s.name} for s in settings],
        "results": [], "not_run": []}
    write_json_atomically(payload, path)
    durations: list[float] = []
    for index, setting in enumerate(settings):
        now = time.monotonic()
        if deadline is not None and (now > deadline or
                                     (durations and now + min(durations) > deadline)):
            payload["not_run"].append({"setting": setting.name, "reason": (
                "the deadline had passed" if now > deadline else
                f"would end after the deadline ({deadline - now:.0f} s left, the quickest "
                f"setting so far took {min(durations):.0f} s)")})
            continue
        eta = ("" if not durations else
               f", ETA {statistics.fmean(durations) * (len(settings) - index):.0f} s")
        print(f"[{time.monotonic() - started:6.1f} s] setting {index + 1}/{len(settings)}"
              f"{eta}: {setting.name}", flush=True)
        config = train_config(setting, steps, args.device, device.type == "cpu",
                              args.peak_tflops)
        row = run_setting(setting, config, process, warmup)
        durations.append(row["seconds"])
        payload["results"].append(row)
        write_json_atomically(payload, path)  # after each setting: a killed run keeps it
        if row["status"] == "ok":
            mfu = "" if row["mfu"] is None else f", MFU {row['mfu']:.1%}"
            print(f"    {row['tokens_per_s']:,.0f} tokens/s, {row['tflops_per_device']:.2f} "
                  f"TFLOP/s{mfu} ({row['seconds']:.1f} s)", flush=True)
        else:
            print(f"    failed: {row['error']}", flush=True)
    payload["status"] = "deadline" if payload["not_run"] else "complete"
    write_json_atomically(payload, path)
    print()
    if env["is_cpu"]:
        print("*** CPU FIGURES - the tiny model on the CPU: they test the benchmark, not a "
              "GPU ***")
    print(format_table(payload["results"]))
    for skipped in payload["not_run"]:
        print(f"not run: {skipped['setting']}: {skipped['reason']}")
    print(f"\nresults written to {path}")
    return 1 if any(r["status"] != "ok" for r in payload["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
