"""The training run: a ``Trainer`` builds the process groups, model chunks, optimizer,
pipeline schedule, data and checkpointer once; ``train_step`` runs one optimizer step;
``state_dict`` is everything a resume needs, layout-free (``eurocore.train.checkpoint``).
``train`` runs a whole ``TrainConfig``, resuming from its latest checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eurocore.data import Batch, SyntheticSource, TokenSource
from eurocore.data.corpus import DEFAULT_CACHE_DIR, CorpusSource
from eurocore.data.loader import prefetch
from eurocore.data.tokenizer import tokenizer_info
from eurocore.model import ModelConfig, check_token_ids, stage_chunks, sum_tied_embedding_grads
from eurocore.model.memory import StageActivations, activation_bytes_per_rank, parameters_per_rank
from eurocore.parallel import ParallelGroups, clip_grad_norm_, local_part
from eurocore.parallel.data_parallel import set_gradient_sync, shard_data_parallel
from eurocore.parallel.pipeline import run_schedule, stage_layers
from eurocore.parallel.schedules import bubble_fraction, schedule
from eurocore.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_resumable,
    init_optimizer_state,
    layout_free_tensors,
    restore_rng,
    rng_tensors,
    set_optimizer_steps,
    versions,
)
from eurocore.train.config import RunLayout, TrainConfig
from eurocore.train.distributed import Process
from eurocore.train.metrics import (
    MetricsWriter,
    Progress,
    device_name,
    device_peak,
    format_duration,
)
from eurocore.train.optim import adamw, learning_rate
from eurocore.train.preemption import Preempted, StopSignals

__all__ = ["RankMemory", "RunLayout", "TrainConfig", "Trainer", "build_source", "check_memory",
           "estimate_memory", "train"]


def build_source(config: TrainConfig, model_config: ModelConfig) -> TokenSource:
    """The run's token source: the corpora of ``config.data_path`` (their token ids checked
    against the model's vocabulary), else the synthetic Markov source over the model's
    vocabulary. Raises ValueError naming the option whose data is wrong."""
    if config.data_path is None:
        return SyntheticSource(model_config.vocab_size, config.batch_size, config.seq_len,
                               branching=config.markov_branching, seed=config.data_seed)
    source = CorpusSource(
        config.data_path, seq_len=config.seq_len, batch_size=config.batch_size,
        seed=config.data_seed, split=config.split, valid_data_path=config.valid_data_path,
        document_masking=config.document_masking,
        cache_dir=config.data_cache_dir or DEFAULT_CACHE_DIR, planned_steps=config.steps,
        eval_samples=config.eval_iters * config.batch_size if config.eval_every else 0)
    if config.tokenizer is not None:
        ours = tokenizer_info(config.tokenizer, eos_token=None, need_eos=False).sha256
        for prefix, made_with in source.tokenizers().items():
            if made_with != ours:
                raise ValueError(f"tokenizer: {config.tokenizer!r} is not the tokenizer that "
                                 f"made {prefix!r} (sha256 {ours[:12]}... against "
                                 f"{made_with[:12]}... in its .json)")
    largest = source.max_token_id()
    if largest >= model_config.vocab_size:
        where = ("init_from_hf's config.json sets it: the corpora are not of its tokenizer"
                 if config.init_from_hf is not None else
                 "--tokenizer sets it from the tokenizer that made them")
        raise ValueError(f"data_path: the corpora hold token id {largest}, beyond the model's "
                         f"vocab_size {model_config.vocab_size} ({where})")
    return source


class Trainer:
    """One training run on the processes of ``process``'s world.

    Construction checks what depends on the world (``config.layout``) and a memory estimate
    before any process group or model exists, then builds the groups, this rank's model
    chunks (FSDP2-wrapped over data parallelism), AdamW, the pipeline schedule and the data
    (``data``, else :func:`build_source`). Only rank 0 calls ``log``.

    Checkpoints go to ``config.checkpoint_dir`` (default OUTPUT_DIR/checkpoints; none
    without either), every ``checkpoint_every`` steps and after the last; ``stop`` (the
    command line's SIGTERM/SIGUSR1 handler) makes every rank save and raise
    :class:`~eurocore.train.preemption.Preempted` at the next step boundary.

    Attributes:
        step: the next optimizer step to run (0 for a new run).
        model: this rank's chunks, one per virtual stage (``nn.ModuleList``).
        checkpointer: the run's :class:`~eurocore.train.checkpoint.Checkpointer`, or None
            (no checkpoint directory and nothing to resume from).
        groups, layout, data, optimizer, model_config: the run's pieces.
    """

    def __init__(self, config: TrainConfig, process: Process,
                 log: Callable[[str], None] = print, data: TokenSource | None = None,
                 stop: StopSignals | None = None) -> None:
        self.config, self.process = config, process
        self.model_config = config.model_config()
        self.layout = config.layout(process.world_size)
        check_memory(self.model_config, process.device, process.world_size)
        self.data = data if data is not None else build_source(config, self.model_config)
        self.groups = ParallelGroups.build(tp=config.tp, pp=config.pp,
                                           device_type=process.device.type)
        self.schedule_steps = schedule(self.layout.schedule, self.groups.pp_rank, config.pp,
                                       self.layout.num_microbatches, config.vpp)
        # Ids are checked in the data path, once per batch on the CPU (check_token_ids in
        # train_step), so the model skips its per-forward check and the synchronisation.
        self.model = nn.ModuleList(
            shard_data_parallel(chunk, self.groups, chunk.layers)
            for chunk in stage_chunks(self.model_config, self.groups, num_chunks=config.vpp,
                                      layers_per_stage=config.layers_per_stage,
                                      sequence_parallel=config.sequence_parallel,
                                      device=process.device, check_ids=False,
                                      recompute=config.recompute,
                                      recompute_layers=config.recomputed_layers(),
                                      fused_loss=config.fused_loss))
        self.optimizer = adamw(self.model, lr=config.lr, weight_decay=config.weight_decay)
        self.bf16 = process.device.type == "cuda" if config.bf16 is None else config.bf16
        self.step = 0
        self._rows = slice(self.groups.dp_rank * self.layout.per_replica,
                           (self.groups.dp_rank + 1) * self.layout.per_replica)
        self._batches = None
        self._log = log if process.rank == 0 else (lambda _: None)
        seq_shard = (config.seq_len // config.tp if config.sequence_parallel
                     else config.seq_len)
        self._activation_shape = (seq_shard, self.layout.micro_batch_size,
                                  self.model_config.hidden_size)
        directory = config.checkpoint_dir or (os.path.join(config.output_dir, "checkpoints")
                                              if config.output_dir else None)
        self._saving = directory is not None and config.checkpoint_every > 0
        if directory is None and config.resume not in ("auto", "none"):
            directory = os.path.dirname(config.resume)  # to read from, not to write to
        self.checkpointer = None if directory is None else Checkpointer(
            directory, keep_last=config.keep_last, async_save=config.async_checkpoint,
            log=self._log)
        self.stop = stop
        self._saved_step: int | None = None
        self._data_wait_s = 0.0  # since the last logged step
        self._hf_tokens = None  # the special token ids of init_from_hf's model, read once
        if config.init_from_hf is not None:
            from eurocore.train.hf import special_tokens

            self._hf_tokens = special_tokens(config.init_from_hf)
        self.flops_per_token = self.model_config.training_flops_per_token(config.seq_len)
        self.peak_tflops, self.peak_source = device_peak(process.device, config.peak_tflops)
        self._describe()
        if self.peak_tflops is not None:
            self._log(f"mfu: against {self.peak_tflops:g} TFLOP/s per device "
                      f"({self.peak_source}); "
                      f"{self.flops_per_token / 1e9:.3g} GFLOP per token trained")

    def _describe(self) -> None:
        """The start-up summary (rank 0): model, layout, parameters per stage, data."""
        config, run = self.config, self.layout
        model = (config.preset if config.init_from_hf is None else
                 f"{os.path.basename(os.path.normpath(config.init_from_hf))} (Hugging Face)")
        self._log(f"eurocore train: {model} "
                  f"({self.model_config.num_parameters() / 1e6:.2f}M parameters) on "
                  f"{self.process.world_size} x {self.process.device.type}"
                  f"{', bf16 autocast' if self.bf16 else ''}")
        sp_note = " (sequence parallel)" if config.sequence_parallel else ""
        vpp_note = f" ({config.vpp} virtual stages each)" if config.vpp > 1 else ""
        dp_note = " (FSDP2)" if run.dp > 1 else ""
        microbatches = run.num_microbatches
        self._log(f"layout: tp {config.tp}{sp_note} x pp {config.pp}{vpp_note} x dp "
                  f"{run.dp}{dp_note}; {microbatches} microbatch"
                  f"{'es' if microbatches > 1 else ''} of {run.micro_batch_size} x "
                  f"{config.seq_len} tokens per replica; schedule {run.schedule}; expected "
                  f"pipeline bubble {bubble_fraction(config.pp, microbatches, config.vpp):.1%}")
        per_stage = _parameters_per_stage(self.model, self.groups)
        self._log("parameters per rank: " + ", ".join(
            f"stage {stage} {count / 1e6:.3f}M" for stage, count in enumerate(per_stage)))
        self._log(f"data: {self.data.describe()}")

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step``: warmup, then cosine to min_lr."""
        config = self.config
        return learning_rate(
            step, peak=config.lr, total_steps=config.steps,
            warmup_steps=config.steps // 10 if config.warmup_steps is None
            else config.warmup_steps,
            minimum=config.lr / 10 if config.min_lr is None else config.min_lr)

    def train_step(self) -> dict[str, Any]:
        """Runs optimizer step ``self.step`` and advances it.

        Returns the step's metrics: ``step``, ``lr`` (floats), ``loss`` (the mean over the
        global batch) and ``grad_norm`` (before clipping) as 0-dim fp32 tensors on the
        device, so that a step need not wait for the device (``.item()`` does).
        """
        step = self.step
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The global batch is a function of the step alone; each replica takes its rows,
        # so every layout trains on the same microbatches.
        if self._batches is None:  # read ahead from here (again after a load_state_dict)
            self._batches = prefetch(self.data, self._rows, start=step, stop=None,
                                     workers=self.config.data_workers,
                                     pin=self.process.device.type == "cuda")
        waited = time.perf_counter()
        loaded, batch = next(self._batches)
        self._data_wait_s += time.perf_counter() - waited  # the loader fell behind
        assert loaded == step, (loaded, step)
        loss = self._run(batch, forward_only=False)
        sum_tied_embedding_grads(self.model, self.groups)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.config.grad_clip,
                                    self.groups)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm}

    def _run(self, batch: Batch, forward_only: bool) -> torch.Tensor:
        """This rank's rows of one global batch through the pipeline schedule; returns the
        mean loss per trained token of the global batch (every rank). The ids are checked
        here, on the CPU, before the copy (the model's own check is off).

        Every token weighs the same, whatever microbatch or replica holds it (rows hold
        different numbers of labels, so a mean of microbatch means would depend on the
        layout): microbatch b's mean loss over its k_b tokens is scaled by
        ``m · dp · k_b / N``, N the global batch's trained tokens, so that the schedule's
        1/m and FSDP's mean over replicas leave each gradient that of Σ loss / N.
        """
        run = self.layout
        check_token_ids(self.model_config, batch.tokens, batch.labels, batch.position_ids)
        device = self.process.device
        parts = [t.to(device, non_blocking=True).split(run.micro_batch_size)
                 for t in (batch.tokens, batch.labels, batch.position_ids)]
        kept = (batch.labels != -100).reshape(run.num_microbatches, -1).sum(dim=1)
        total = kept.sum().to(device)
        if run.dp > 1:  # on the device, without waiting for it
            torch.distributed.all_reduce(total, group=self.groups.dp_group)
        scales = (kept.to(device) * (run.num_microbatches * run.dp)) / total.clamp_min(1)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if self.bf16 else contextlib.nullcontext())

        def forward_step(chunk: int, mb: int, hidden: torch.Tensor | None) -> torch.Tensor:
            tokens, labels, positions = (part[mb] for part in parts)
            with autocast:
                out = self.model[chunk](tokens, labels, position_ids=positions,
                                        hidden_states=hidden)
            return out * scales[mb] if self.model[chunk].post_process else out

        loss = run_schedule(
            self.schedule_steps, forward_step, self.groups, num_chunks=self.config.vpp,
            num_microbatches=run.num_microbatches, activation_shape=self._activation_shape,
            dtype=next(self.model.parameters()).dtype, device=self.process.device,
            before_backward=lambda c, last: set_gradient_sync(self.model[c], last),
            forward_only=forward_only)
        if run.dp > 1:  # each replica's share of Σ loss / N, summed (the scales above)
            torch.distributed.all_reduce(loss, group=self.groups.dp_group)
            loss /= run.dp
        return loss

    def evaluate(self) -> float | None:
        """The mean loss over the validation batches 0 .. eval_iters - 1 (the same ones in
        every layout and every time), None without validation data."""
        losses = []
        for index in range(self.config.eval_iters):
            batch = self.data.validation_batch(index, self._rows)
            if batch is None:
                return None
            losses.append(self._run(batch, forward_only=True))
        return torch.stack(losses).mean().item()

    def train(self, on_step: Callable[[dict[str, float]], None] | None = None
              ) -> list[dict[str, float]]:
        """Runs the steps from ``self.step`` to ``config.steps``, logging every
        ``log_every`` steps and the last: the metrics of each logged step (step, loss, lr,
        grad_norm, tokens_per_s (global), tokens_per_s_per_device, step_ms,
        tflops_per_device, mfu (None where the device's peak is unknown), data_wait_ms (per
        step, waiting for the loader), elapsed_s (since this call began), on GPUs
        max_allocated_gib and max_reserved_gib since the last log, and valid_loss at
        validation) are returned on every rank and passed to
        ``on_step`` as they come. With an output directory, rank 0 also writes them to
        OUTPUT_DIR/metrics.jsonl and TensorBoard (:class:`~eurocore.train.metrics.
        MetricsWriter`). Saves the checkpoints that are due (and waits for the
        last one to be complete).

        Raises:
            FloatingPointError: a logged loss or gradient norm is not finite (diverged).
            Preempted: a rank received a stop signal; the checkpoint of this step is
                complete.
            CheckpointError: a save failed.
        """
        sink = self._metrics_writer()
        try:
            return self._train(on_step, sink)
        finally:  # however the run ends: the file closed, TensorBoard's events flushed
            if sink is not None:
                sink.close()

    def _train(self, on_step: Callable[[dict[str, float]], None] | None,
               sink: MetricsWriter | None) -> list[dict[str, float]]:
        config = self.config
        floor = self.data.loss_floor
        floor_note = f" (floor {floor:.4f})" if floor is not None else ""
        tokens_per_step = config.batch_size * config.seq_len
        history: list[dict[str, float]] = []
        last_time, last_step = time.perf_counter(), self.step - 1
        progress = Progress(self.step, config.steps, start=last_time)
        if self.step >= config.steps:  # resumed from the checkpoint after the last step
            self._log(f"done: the run is at step {self.step}, the end of its {config.steps} "
                      f"steps; nothing to train (a larger --steps goes on)")
        while self.step < config.steps:
            result = self.train_step()
            step = result["step"]
            last = step == config.steps - 1
            valid = None
            if config.eval_every and ((step + 1) % config.eval_every == 0 or last):
                valid = self.evaluate()
            if step % config.log_every == 0 or last or valid is not None:
                loss, norm = result["loss"].item(), result["grad_norm"].item()  # waits
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise FloatingPointError(
                        f"loss: {loss} with gradient norm {norm} at step {step} (lr "
                        f"{result['lr']:.3g}): the run diverged; lower the learning rate or "
                        f"raise the warmup")
                now = time.perf_counter()
                # averaged over the steps since the last log: the device runs ahead between
                per_step = (now - last_time) / (step - last_step)
                previous = last_step
                last_time, last_step = now, step
                tokens_per_s = tokens_per_step / per_step
                tflops = tokens_per_s * self.flops_per_token / self.process.world_size / 1e12
                elapsed, eta = progress.update(step, now)
                metrics = {"step": step, "loss": loss, "lr": result["lr"], "grad_norm": norm,
                           "tokens_per_s": tokens_per_s,
                           "tokens_per_s_per_device": tokens_per_s / self.process.world_size,
                           "step_ms": 1e3 * per_step,
                           "tflops_per_device": tflops,
                           "mfu": (tflops / self.peak_tflops if self.peak_tflops is not None
                                   else None),
                           "data_wait_ms": 1e3 * self._data_wait_s / (step - previous),
                           "elapsed_s": elapsed, **self._memory()}
                self._data_wait_s = 0.0
                valid_note = ""
                if valid is not None:
                    metrics["valid_loss"] = valid
                    valid_note = f" | valid loss {valid:.4f}"
                history.append(metrics)
                if sink is not None:  # rank 0, logged steps only: a line and queued scalars
                    sink.write(metrics)
                if on_step is not None:
                    on_step(metrics)
                self._log(f"step {step:5d} | loss {loss:.4f}{floor_note}{valid_note} | lr "
                          f"{result['lr']:.2e} | grad norm {norm:.3f} | "
                          f"{metrics['tokens_per_s']:,.0f} tokens/s | "
                          f"{metrics['step_ms']:.1f} ms"
                          + (f" | {tflops:.1f} TFLOP/s per device, MFU {metrics['mfu']:.1%}"
                             if metrics["mfu"] is not None else "")
                          + f" | {format_duration(elapsed)} elapsed"
                          + ("" if last else f", eta {format_duration(eta)}"))
                for line in self.data.progress(step + 1) if not last else ():  # what's next
                    self._log(f"data: {line}")
            self._after_step(last)
        if self.checkpointer is not None:
            self.checkpointer.wait()
        if history:
            summary = (f" (floor {floor:.4f}, {history[-1]['loss'] - floor:+.4f} above it)"
                       if floor is not None else "")
            first = history[0]["step"]  # past 0 when the run resumed from a checkpoint
            span = (f"in {config.steps} steps" if first == 0 else
                    f"from step {first} to {config.steps - 1} (of {config.steps})")
            self._log(f"done: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} "
                      f"{span}{summary}")
        return history

    def _metrics_writer(self) -> MetricsWriter | None:
        """Rank 0's :class:`~eurocore.train.metrics.MetricsWriter` on the output directory
        (None on other ranks and without one), its first line this start's metadata."""
        config = self.config
        if self.process.rank != 0 or config.output_dir is None:
            return None
        run = {"start_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "start_step": self.step, "resumed": self.step > 0,
               "config": json.loads(json.dumps(dataclasses.asdict(config))),
               "model_config": json.loads(json.dumps(dataclasses.asdict(self.model_config))),
               "layout": {**self._layout_meta(), "micro_batch_size": self.layout.micro_batch_size,
                          "num_microbatches": self.layout.num_microbatches,
                          "schedule": self.layout.schedule},
               "world_size": self.process.world_size, "device": device_name(self.process.device),
               "peak_tflops": self.peak_tflops, "peak_source": self.peak_source,
               "flops_per_token": self.flops_per_token, "versions": versions()}
        sink = MetricsWriter(config.output_dir, run, self.step, tensorboard=config.tensorboard)
        events = ("TensorBoard events in tensorboard/" if sink.tensorboard else
                  "TensorBoard off" if not config.tensorboard else
                  "no TensorBoard: pip install eurocore[tensorboard]")
        self._log(f"metrics: {sink.path} ({events})")
        return sink

    def _memory(self) -> dict[str, float | None]:
        """The device memory peaks since the last call, GiB (None on a CPU), then reset."""
        device = self.process.device
        if device.type != "cuda":
            return {"max_allocated_gib": None, "max_reserved_gib": None}
        peaks = {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                 "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return peaks

    def _after_step(self, last: bool) -> None:
        """Saves the checkpoint that is due (every checkpoint_every steps and after the
        last), and stops every rank alike when one of them received a stop signal or its
        background save failed (the ranks agree through ``stop``; without it a failure
        shows at the next save or the end)."""
        if self._saving and (self.step % self.config.checkpoint_every == 0 or last):
            self.save_checkpoint()
        failed = self.checkpointer is not None and self.checkpointer.failed()
        signal_name = None
        if self.stop is not None:
            signal_name, failed = self.stop.agreed(failed)
        elif self.process.world_size > 1:
            failed = False  # no agreement: a rank alone must not stop
        if failed:
            self.checkpointer.wait()  # raises the save's CheckpointError
            raise CheckpointError("checkpoint: a background save failed on another rank")
        if signal_name is None:
            return
        if not self._saving:
            self._log(f"{signal_name} received: stopping (checkpoints are off)")
            raise Preempted(self.step, signal_name, saved=False, why="checkpoint_every = 0"
                            if self.config.checkpoint_every == 0 else "no checkpoint directory")
        self._log(f"{signal_name} received: saving a checkpoint and stopping")
        if self._saved_step != self.step:
            self.save_checkpoint()
        self.checkpointer.wait()
        raise Preempted(self.step, signal_name)

    # --- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, layout-free (any TP, PP, DP layout can load it):

        - ``tensors``: canonical name -> this rank's box of that full tensor (every weight
          and both AdamW moments: ``eurocore.train.checkpoint.TensorBox``, views that DCP
          writes, or fills in place to load), and this rank's random generator states;
        - ``meta`` (JSON): the next step, the samples consumed, the data's identity, the
          run's and the model's configs, and the layout.

        Makes AdamW's state (zero, as the first step would) if no step ran yet.
        """
        init_optimizer_state(self.optimizer)
        tensors: dict[str, Any] = layout_free_tensors(list(self.model), self.optimizer)
        tensors.update(rng_tensors(self.process.rank, self.process.device))
        config = self.config
        meta = {"step": self.step, "consumed_samples": self.step * config.batch_size,
                "data": self.data.state_dict(),
                "config": json.loads(json.dumps(dataclasses.asdict(config))),
                "model_config": dataclasses.asdict(self.model_config),
                "layout": self._layout_meta()}
        if self._hf_tokens is not None:  # for an export to carry the special tokens over
            meta["hf_tokens"] = self._hf_tokens
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes a :meth:`state_dict` of a run in the same layout (a checkpoint, through
        :meth:`resume`, also reshards): checks ``meta`` against this run (the model's shape,
        the global batch, the data; ValueError naming what differs), copies the tensors and
        sets the step, AdamW's step counts and the random generators."""
        meta = state["meta"]
        if meta["layout"] != self._layout_meta():
            raise ValueError(f"layout: the state is of layout {meta['layout']}, this run's "
                             f"{self._layout_meta()}; a checkpoint (resume) reshards")
        self._check_resumable(meta)
        ours = self.state_dict()["tensors"]
        for name, box in ours.items():
            saved = state["tensors"][name]
            (box.local if hasattr(box, "local") else box).copy_(
                saved.local if hasattr(saved, "local") else saved)
        restore_rng(ours, self.process.rank, self.process.device)
        self._loaded(meta)

    def _layout_meta(self) -> dict[str, Any]:
        config = self.config
        return {"world_size": self.process.world_size, "tp": config.tp, "pp": config.pp,
                "vpp": config.vpp, "dp": self.layout.dp,
                "sequence_parallel": config.sequence_parallel,
                "layers_per_stage": [len(r) for r in stage_layers(
                    self.model_config.num_layers, config.pp * config.vpp,
                    config.layers_per_stage)]}

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        check_resumable(meta, self.model_config, self.config.batch_size)
        self.data.load_state_dict(meta["data"])

    def _loaded(self, meta: dict[str, Any]) -> None:
        """After the tensors of ``meta``'s state were loaded: the step and what follows."""
        set_optimizer_steps(self.optimizer, meta["step"])
        self.step = meta["step"]
        self._batches = None  # read ahead from the restored step
        self._saved_step = self.step

    def save_checkpoint(self) -> None:
        """Saves the checkpoint of ``self.step`` (in the background with async_checkpoint),
        logging how long training waited."""
        state = self.state_dict()
        waited = self.checkpointer.save(state["tensors"], state["meta"], self.step)
        self._saved_step = self.step
        self._log(f"checkpoint: step {self.step}: training waited {waited * 1e3:.0f} ms"
                  + (" (written in the background)" if self.config.async_checkpoint else ""))

    def init_from_hf(self) -> None:
        """Loads ``config.init_from_hf``'s weights (a Hugging Face checkpoint) into this
        rank's chunks, each rank reading only its slices; before the first step."""
        from eurocore.train.hf import load_hf_weights

        if self.step != 0:
            raise RuntimeError("init_from_hf: a run starts from HF weights at step 0 only")
        load_hf_weights(list(self.model), self.config.init_from_hf)
        self._log(f"initialised from the Hugging Face checkpoint {self.config.init_from_hf}")

    def resume(self) -> bool:
        """Loads the checkpoint ``config.resume`` names ("auto": the newest intact one in
        the checkpoint directory), in whatever layout it was saved; returns whether there
        was one. Removes the directories of interrupted saves first. Raises ValueError when
        the checkpoint cannot be taken (another model shape or batch, other data, a damaged
        explicit path)."""
        if self.checkpointer is None:
            return False
        if self._saving:  # not in a directory the run only reads from: its saves may be live
            self.checkpointer.remove_interrupted()
        found = self.checkpointer.find(self.config.resume)
        if found is None:
            return False
        path, info = found
        meta = info["meta"]
        self._check_resumable(meta)
        tensors = self.state_dict()["tensors"]
        same_layout = meta["layout"] == self._layout_meta()
        if not same_layout:  # another layout's ranks: their generators are not ours
            tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
        self.checkpointer.load(path, tensors)
        if same_layout:
            restore_rng(tensors, self.process.rank, self.process.device)
        self._loaded(meta)
        saved = meta["layout"]
        schedule_changes = [f"{name} {meta['config'].get(name)} -> {getattr(self.config, name)}"
                            for name in ("steps", "lr", "min_lr", "warmup_steps")
                            if meta["config"].get(name) != getattr(self.config, name)]
        if schedule_changes:  # allowed (a run made longer), but never silently
            self._log(f"resume: the learning-rate schedule is this run's, not the saved "
                      f"run's ({', '.join(schedule_changes)})")
        self._log(f"resumed from {path} at step {self.step} (saved with tp {saved['tp']}, pp "
                  f"{saved['pp']}, vpp {saved['vpp']}, dp {saved['dp']}"
                  + ("" if same_layout else "; another layout: weights and moments "
                     "resharded, random generators not restored") + ")")
        return True


def train(config: TrainConfig, process: Process, log: Callable[[str], None] = print,
          on_finish: Callable[[nn.ModuleList, ParallelGroups], None] | None = None,
          on_step: Callable[[dict[str, float]], None] | None = None,
          data: TokenSource | None = None, stop: StopSignals | None = None
          ) -> list[dict[str, float]]:
    """Trains one model as ``config`` says: a :class:`Trainer`, resumed from the checkpoint
    ``config.resume`` names when there is one (else started from ``config.init_from_hf``'s
    weights, if set), then ``Trainer.train``; returns the logged
    metrics. ``on_finish`` receives this rank's model chunks and the groups after the last
    step (saving, checking); ``data`` and ``stop`` as the Trainer takes them."""
    trainer = Trainer(config, process, log, data=data, stop=stop)
    try:
        if not trainer.resume() and config.init_from_hf is not None:
            trainer.init_from_hf()
        history = trainer.train(on_step)
    finally:
        if trainer.checkpointer is not None:
            trainer.checkpointer.close()
    if on_finish is not None:
        on_finish(trainer.model, trainer.groups)
    return history


# Bytes per parameter that a rank keeps for the whole run: fp32 weight and gradient, and
# AdamW's two fp32 moments. Activations come on top, so this is a floor.
STATE_BYTES = {"weights": 4, "gradients": 4, "optimizer": 8}
STATE_BYTES_PER_PARAMETER = sum(STATE_BYTES.values())


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """The estimated memory of one rank of a pipeline stage at its peak (bytes): its
    parameters' ``weights``, ``gradients`` and ``optimizer`` state (STATE_BYTES each), and
    the ``activations`` its schedule holds at once (``activation_peak``)."""

    stage: int
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activation_peak: StageActivations

    @property
    def total(self) -> int:
        """Every term, summed."""
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(config: TrainConfig, world_size: int) -> list[RankMemory]:
    """The memory per rank of each pipeline stage (index = stage) that ``config`` needs on
    ``world_size`` processes, from the config alone (no model, group or GPU): the
    parameters of ``eurocore.model.memory.parameters_per_rank`` (the data-parallel rank
    holding the most) at STATE_BYTES each, and the activation peak of
    ``activation_bytes_per_rank`` for the run's microbatches, schedule, recomputation and
    loss; bf16 activations when autocast is on (``bf16``, default: unless ``device`` is
    cpu), else counted twice (fp32: an upper bound). Raises ValueError as
    ``config.layout`` does."""
    layout = config.layout(world_size)
    model = config.model_config()
    shape = {"tp": config.tp, "pp": config.pp, "vpp": config.vpp,
             "layers_per_stage": config.layers_per_stage}
    parameters = parameters_per_rank(model, dp=layout.dp, **shape)
    peaks = activation_bytes_per_rank(
        model, seq=config.seq_len, micro_batch=layout.micro_batch_size,
        num_microbatches=layout.num_microbatches, sequence_parallel=config.sequence_parallel,
        recompute=config.recompute, recompute_layers=config.recomputed_layers(),
        fused_loss=config.fused_loss, schedule_name=layout.schedule, **shape)
    bf16 = config.device != "cpu" if config.bf16 is None else config.bf16
    return [RankMemory(stage, count, **{kind: count * size for kind, size in STATE_BYTES.items()},
                       activations=peak.bytes * (1 if bf16 else 2), activation_peak=peak)
            for stage, (count, peak) in enumerate(zip(parameters, peaks, strict=True))]


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
