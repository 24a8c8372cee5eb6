"""The training loop: model, synthetic data, AdamW, schedule, clipping, logging."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eurocore.model import (
    ModelConfig,
    check_token_ids,
    preset,
    stage_chunks,
    sum_tied_embedding_grads,
)
from eurocore.parallel import ParallelGroups, clip_grad_norm_, local_part
from eurocore.parallel.data_parallel import set_gradient_sync, shard_data_parallel
from eurocore.parallel.pipeline import run_schedule, stage_layers
from eurocore.parallel.schedules import bubble_fraction, schedule
from eurocore.train.data import MarkovSource, uniform_loss
from eurocore.train.distributed import Process
from eurocore.train.optim import adamw, learning_rate
from eurocore.utils.checks import check_bool, check_int, check_number


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` counts sequences per optimizer step (the global
    batch), split into microbatches of ``micro_batch_size`` (default: one microbatch) whose
    gradients accumulate; their losses are averaged with equal weights. ``vpp`` virtual
    stages per pipeline rank select the interleaved 1F1B schedule.

    bf16: autocast matrix products to bfloat16 (parameters, optimizer state and gradients
    stay fp32); None: on GPUs only. warmup_steps None: a tenth of the steps.

    Construction checks every field, alone and against the model it names (a ValueError
    naming the field); :meth:`layout` adds what depends on the number of processes. Both
    run before any process group or model exists.
    """

    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    sequence_parallel: bool = False
    steps: int = 300
    batch_size: int = 16
    micro_batch_size: int | None = None
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    markov_branching: int = 4
    data_seed: int = 0
    log_every: int = 10
    bf16: bool | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "steps", "batch_size", "log_every",
                     "markov_branching"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seq_len", self.seq_len, minimum=2)  # one token has no next one to learn
        check_int("data_seed", self.data_seed, minimum=0, maximum=2**63 - 1)
        if self.micro_batch_size is not None:
            check_int("micro_batch_size", self.micro_batch_size, minimum=1)
            if self.batch_size % self.micro_batch_size:
                raise ValueError(f"micro_batch_size: {self.micro_batch_size} does not divide "
                                 f"batch_size {self.batch_size}")
        # AdamW moves each weight by about lr per step: beyond 1 every step scrambles them.
        check_number("lr", self.lr, minimum=0.0, maximum=1.0, inclusive=False)
        if self.min_lr is not None:
            check_number("min_lr", self.min_lr, minimum=0.0, maximum=self.lr)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, minimum=0, maximum=self.steps)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        if self.lr * self.weight_decay >= 1:  # each step would scale weights by <= 0
            raise ValueError(f"weight_decay: lr · weight_decay = {self.lr * self.weight_decay:g}"
                             f" must stay below 1 (AdamW scales weights by 1 - lr · wd)")
        check_number("grad_clip", self.grad_clip, minimum=0.0, inclusive=False)
        check_bool("sequence_parallel", self.sequence_parallel)
        if self.bf16 is not None:
            check_bool("bf16", self.bf16)
        if self.vpp > 1 and self.pp < 2:
            raise ValueError(f"vpp: {self.vpp} virtual stages interleave a pipeline; they "
                             f"need pp >= 2, got pp = {self.pp}")
        model = self.model_config()
        model.check_layout(self.tp, self.sequence_parallel, self.seq_len)
        if self.seq_len > model.max_seq_len:
            raise ValueError(f"seq_len: {self.seq_len} exceeds the model's max_seq_len "
                             f"{model.max_seq_len}")
        if self.markov_branching > model.vocab_size:
            raise ValueError(f"markov_branching: {self.markov_branching} successors per token "
                             f"exceed the vocabulary of {model.vocab_size}")
        if self.layers_per_stage is not None and not isinstance(self.layers_per_stage, tuple):
            raise TypeError(f"layers_per_stage: expected a tuple of ints, got "
                            f"{type(self.layers_per_stage).__name__}")
        stages = self.pp * self.vpp
        if model.num_layers < stages:
            raise ValueError(f"{'vpp' if self.vpp > 1 else 'pp'}: {stages} pipeline stages "
                             f"need at least as many decoder layers, the model has "
                             f"{model.num_layers}")
        stage_layers(model.num_layers, stages, self.layers_per_stage)

    def model_config(self) -> ModelConfig:
        """The model: the preset with ``model_overrides`` applied."""
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides: expected a dict, got "
                            f"{type(self.model_overrides).__name__}")
        return preset(self.preset, **self.model_overrides)

    def layout(self, world_size: int) -> RunLayout:
        """How the run splits over ``world_size`` processes; raises ValueError naming the
        option that does not fit (before any process group is made)."""
        check_int("world_size", world_size, minimum=1)
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            name = "pp" if self.tp == 1 else "tp"  # the option the user set
            raise ValueError(f"{name}: tp · pp = {model_parallel} does not divide the world "
                             f"size {world_size}")
        dp = world_size // model_parallel
        if self.batch_size % dp:
            raise ValueError(f"batch_size: {self.batch_size} sequences do not split over "
                             f"{dp} data-parallel replicas")
        per_replica = self.batch_size // dp
        micro = self.micro_batch_size or per_replica
        if per_replica % micro:
            raise ValueError(f"micro_batch_size: {micro} does not divide the {per_replica} "
                             f"sequences of each of the {dp} data-parallel replicas")
        num_microbatches = per_replica // micro
        if self.vpp > 1 and num_microbatches % self.pp:
            raise ValueError(f"micro_batch_size: interleaving needs the microbatches per "
                             f"replica ({num_microbatches}) to be a multiple of pp = {self.pp}")
        return RunLayout(dp, per_replica, micro, num_microbatches,
                         "interleaved-1f1b" if self.vpp > 1 else "1f1b")


@dataclass(frozen=True)
class RunLayout:
    """What :meth:`TrainConfig.layout` derives from the world size: data-parallel replicas,
    sequences per replica and per microbatch, microbatches per step, the schedule."""

    dp: int
    per_replica: int
    micro_batch_size: int
    num_microbatches: int
    schedule: str


def train(config: TrainConfig, process: Process, log: Callable[[str], None] = print,
          on_finish: Callable[[nn.ModuleList, ParallelGroups], None] | None = None,
          on_step: Callable[[dict[str, float]], None] | None = None,
          ) -> list[dict[str, float]]:
    """Trains one model as ``config`` says on the processes of ``process``'s world.

    Every rank returns the metrics of each logged step (step, loss, lr, grad_norm,
    tokens_per_s, step_ms); only rank 0 calls ``log``. ``on_step`` receives each logged
    step's metrics as it is logged (on every rank; writing them out as they come), and
    ``on_finish`` this rank's model chunks and the groups after the last step (saving,
    checking).

    Every option is checked (``config.layout``, a memory estimate) before any process
    group or model is made.
    """
    model_config = config.model_config()
    run = config.layout(process.world_size)
    dp, per_replica, micro = run.dp, run.per_replica, run.micro_batch_size
    num_microbatches, schedule_name = run.num_microbatches, run.schedule
    check_memory(model_config, process.device, process.world_size)
    source = MarkovSource(model_config.vocab_size, config.markov_branching, config.data_seed)
    groups = ParallelGroups.build(tp=config.tp, pp=config.pp,
                                  device_type=process.device.type)
    schedule_steps = schedule(schedule_name, groups.pp_rank, config.pp, num_microbatches,
                              config.vpp)
    # Ids are checked in the data path, once per batch on the CPU (check_token_ids below),
    # so the model skips its per-forward check and the synchronisation it costs.
    model = nn.ModuleList(
        shard_data_parallel(chunk, groups, chunk.layers)
        for chunk in stage_chunks(model_config, groups, num_chunks=config.vpp,
                                  layers_per_stage=config.layers_per_stage,
                                  sequence_parallel=config.sequence_parallel,
                                  device=process.device, check_ids=False))
    optimizer = adamw(model, lr=config.lr, weight_decay=config.weight_decay)
    floor = source.entropy_rate()
    bf16 = process.device.type == "cuda" if config.bf16 is None else config.bf16
    autocast = (torch.autocast(process.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    say = log if process.rank == 0 else (lambda _: None)
    say(f"eurocore train: {config.preset} ({model_config.num_parameters() / 1e6:.2f}M "
        f"parameters) on {process.world_size} x {process.device.type}"
        f"{', bf16 autocast' if bf16 else ''}")
    sp_note = " (sequence parallel)" if config.sequence_parallel else ""
    vpp_note = f" ({config.vpp} virtual stages each)" if config.vpp > 1 else ""
    dp_note = " (FSDP2)" if dp > 1 else ""
    say(f"layout: tp {config.tp}{sp_note} x pp {config.pp}{vpp_note} x dp {dp}{dp_note}; "
        f"{num_microbatches} microbatch{'es' if num_microbatches > 1 else ''} of {micro} x "
        f"{config.seq_len} tokens per replica; "
        f"schedule {schedule_name}; expected pipeline bubble "
        f"{bubble_fraction(config.pp, num_microbatches, config.vpp):.1%}")
    per_stage = _parameters_per_stage(model, groups)
    say("parameters per rank: " + ", ".join(
        f"stage {stage} {count / 1e6:.3f}M" for stage, count in enumerate(per_stage)))
    say(f"data: Markov source over {model_config.vocab_size} tokens, {config.markov_branching} "
        f"successors each; loss floor (entropy rate) {floor:.4f}, uniform "
        f"{uniform_loss(model_config.vocab_size):.4f} nats")
    tokens_per_step = config.batch_size * config.seq_len
    seq_shard = config.seq_len // config.tp if config.sequence_parallel else config.seq_len
    activation_shape = (seq_shard, micro, model_config.hidden_size)
    activation_dtype = next(model.parameters()).dtype
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    warmup_steps = config.steps // 10 if config.warmup_steps is None else config.warmup_steps
    history = []
    last_time, last_step = time.perf_counter(), -1
    for step in range(config.steps):
        lr = learning_rate(step, peak=config.lr, warmup_steps=warmup_steps,
                           total_steps=config.steps, minimum=min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The global batch is a function of the step alone; each replica takes its rows, so
        # every layout trains on the same microbatches.
        batch = source.batch(config.batch_size, config.seq_len, step)
        check_token_ids(model_config, batch.tokens, batch.labels, batch.position_ids)
        rows = slice(groups.dp_rank * per_replica, (groups.dp_rank + 1) * per_replica)
        parts = [t[rows].to(process.device).split(micro)
                 for t in (batch.tokens, batch.labels, batch.position_ids)]

        def forward_step(chunk: int, mb: int, hidden: torch.Tensor | None,
                         parts=parts) -> torch.Tensor:
            tokens, labels, positions = (part[mb] for part in parts)
            with autocast:
                return model[chunk](tokens, labels, position_ids=positions,
                                    hidden_states=hidden)

        loss = run_schedule(schedule_steps, forward_step, groups, num_chunks=config.vpp,
                            num_microbatches=num_microbatches,
                            activation_shape=activation_shape, dtype=activation_dtype,
                            device=process.device,
                            before_backward=lambda c, last: set_gradient_sync(model[c], last))
        if dp > 1:  # the mean over the replicas, for the log
            torch.distributed.all_reduce(loss, group=groups.dp_group)
            loss /= dp
        sum_tied_embedding_grads(model, groups)
        grad_norm = clip_grad_norm_(model.parameters(), config.grad_clip, groups)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == config.steps - 1:
            loss_value, norm_value = loss.item(), grad_norm.item()  # waits for the step
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise FloatingPointError(
                    f"loss: {loss_value} with gradient norm {norm_value} at step {step} (lr "
                    f"{lr:.3g}): the run diverged; lower the learning rate or raise the "
                    f"warmup")
            now = time.perf_counter()
            # averaged over the steps since the last log: the device runs ahead in between
            per_step = (now - last_time) / (step - last_step)
            last_time, last_step = now, step
            metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                       "tokens_per_s": tokens_per_step / per_step, "step_ms": 1e3 * per_step}
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            say(f"step {step:5d} | loss {loss_value:.4f} (floor {floor:.4f}) | lr {lr:.2e} | "
                f"grad norm {norm_value:.3f} | {metrics['tokens_per_s']:,.0f} tokens/s | "
                f"{metrics['step_ms']:.1f} ms")
    if history:
        say(f"done: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} in "
            f"{config.steps} steps (floor {floor:.4f}, {history[-1]['loss'] - floor:+.4f} "
            f"above it)")
    if on_finish is not None:
        on_finish(model, groups)
    return history


# Bytes per parameter that a rank keeps for the whole run: fp32 weight and gradient, and
# AdamW's two fp32 moments. Activations come on top, so this is a floor.
STATE_BYTES_PER_PARAMETER = 16


def check_memory(model_config: ModelConfig, device: torch.device, world_size: int) -> None:
    """Raises ValueError (naming ``preset``) when the model's weights, gradients and AdamW
    state alone, spread evenly over ``world_size`` processes (TP, PP and FSDP all shard
    them), exceed ``device``'s memory (the host's for CPU processes, which share it): a run
    that would otherwise be killed for memory after building the model."""
    need = STATE_BYTES_PER_PARAMETER * model_config.num_parameters()
    if device.type == "cuda":
        need /= world_size
        have = torch.cuda.get_device_properties(device).total_memory
        where = f"per GPU, more than this GPU's {have / 2**30:.1f} GiB"
    else:  # every CPU process shares the host's memory
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = f"on this host, more than its {have / 2**30:.1f} GiB"
    if need > have:
        raise ValueError(f"preset: {model_config.num_parameters() / 1e9:.2f}B parameters with "
                         f"their gradients and AdamW state take {need / 2**30:.1f} GiB {where}"
                         f"; shard the model over more GPUs (tp, pp, data parallelism) or pick "
                         f"a smaller preset")


def _parameters_per_stage(model: nn.ModuleList, groups: ParallelGroups) -> list[int]:
    """Parameters held by one rank of each pipeline stage (TP and DP shards: each rank of a
    stage holds about the same)."""
    device = next(model.parameters()).device
    local = torch.tensor(sum(local_part(p).numel() for p in model.parameters()), device=device)
    if groups.pp_size == 1:
        return [int(local)]
    counts = [torch.empty_like(local) for _ in range(groups.pp_size)]
    torch.distributed.all_gather(counts, local, group=groups.pp_group)
    return [int(c) for c in counts]
