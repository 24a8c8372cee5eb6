"""The run's configuration: one frozen dataclass whose fields carry their own help, section
and command-line spelling, so the command line and the TOML file are both generated from
it (one source of truth for every option's name, type, default and help).

    config = TrainConfig(tp=2, steps=100)              # in Python
    config = load_config("run.toml", overrides={"lr": 1e-3})   # a file, flags on top
    text = to_toml(config)                             # what load_config reads back

File layout (``configs/`` has examples): sections ``[model]`` (``preset`` and any
``ModelConfig`` field as an override), ``[parallel]``, ``[optimizer]``, ``[data]``,
``[checkpoint]``, ``[logging]`` and ``[run]``, each holding the fields this module assigns
to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eurocore.data.blend import parse_data_path
from eurocore.data.corpus import parse_split
from eurocore.data.tokenizer import load_tokenizer, tokenizer_file
from eurocore.model import ModelConfig, preset
from eurocore.model.llama import RECOMPUTE
from eurocore.parallel.pipeline import stage_layers
from eurocore.utils.checks import check_bool, check_int, check_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

SECTIONS = ("model", "parallel", "optimizer", "data", "checkpoint", "logging", "run")


def option(default: Any, section: str, help: str, *, flag: str | None = None,
           aliases: tuple[str, ...] = (), choices: tuple[str, ...] | None = None,
           metavar: str | None = None, cli: bool = True) -> Any:
    """A TrainConfig field with what the command line and the file need to know of it:
    ``section`` (TOML), ``help``, the ``flag`` (default ``--field-name``; a boolean also
    gets ``--no-field-name``), ``aliases``, ``choices``, ``metavar``; ``cli=False`` keeps
    it to the file."""
    metadata = {"section": section, "help": help, "flag": flag, "aliases": aliases,
                "choices": choices, "metavar": metavar, "cli": cli}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` counts sequences per optimizer step (the global
    batch), split into microbatches of ``micro_batch_size`` (default: one microbatch) whose
    gradients accumulate; their losses are averaged with equal weights. ``vpp`` virtual
    stages per pipeline rank select the interleaved 1F1B schedule.

    Construction checks every field, alone and against the model it names (a ValueError
    naming the field); :meth:`layout` adds what depends on the number of processes. Both
    run before any process group or model exists.
    """

    # [model]
    preset: str = option("tiny", "model", "model preset: tiny, llama-1b, llama3-8b, eurollm-9b")
    num_layers: int | None = option(None, "model", "override the preset's decoder layers",
                                    flag="--layers")
    model_overrides: dict[str, Any] = option(
        {}, "model", "any ModelConfig field over the preset's (the file's [model] keys)",
        cli=False)
    init_from_hf: str | None = option(
        None, "model", "a Hugging Face Llama or Mistral directory (config.json and "
        "safetensors): the model is its config, and a new run starts from its weights (in any "
        "layout); preset and overrides do not apply", metavar="DIR")
    # [parallel]
    tp: int = option(1, "parallel", "tensor-parallel degree")
    pp: int = option(1, "parallel", "pipeline stages")
    vpp: int = option(1, "parallel", "virtual stages per pipeline rank (> 1: interleaved 1F1B)")
    layers_per_stage: tuple[int, ...] | None = option(
        None, "parallel", "decoder layers of each (virtual) stage; default: an even split "
        "with the first and last stages lighter", metavar="N,N,...")
    recompute: str = option(
        "none", "parallel", "activation recomputation: none; selective (the RMSNorm outputs and "
        "the SwiGLU product are computed again in the backward from what their ops keep); "
        "full (each chosen decoder layer keeps only its input and runs again in the "
        "backward)", choices=RECOMPUTE)
    recompute_layers: tuple[int, ...] | None = option(
        None, "parallel", "the decoder layers --recompute applies to (default: all)",
        metavar="N,N,...")
    sequence_parallel: bool = option(False, "parallel",
                                     "split activations along the sequence between TP regions")
    # [optimizer]
    steps: int = option(300, "optimizer", "optimizer steps")
    lr: float = option(3e-3, "optimizer", "peak learning rate, in (0, 1]")
    min_lr: float | None = option(None, "optimizer", "final learning rate (default lr / 10)")
    warmup_steps: int | None = option(None, "optimizer",
                                      "linear warmup steps (default: a tenth of the steps)")
    weight_decay: float = option(0.1, "optimizer", "AdamW weight decay of the matrices")
    grad_clip: float = option(1.0, "optimizer", "gradient norm clipping threshold")
    # [data]
    seq_len: int = option(128, "data", "tokens per sequence")
    batch_size: int = option(16, "data", "sequences per optimizer step (the global batch)",
                             flag="--global-batch-size", aliases=("--batch-size",))
    micro_batch_size: int | None = option(
        None, "data", "sequences per microbatch (default: the global batch, one microbatch)")
    data_path: tuple[str, ...] | None = option(
        None, "data", "tokenized corpora, Megatron's syntax: W1 PREFIX1 W2 PREFIX2 ..., or "
        "prefixes alone (weighted by their tokens); none: the synthetic Markov source",
        metavar="W PREFIX")
    valid_data_path: tuple[str, ...] | None = option(
        None, "data", "validation corpora, the same syntax (instead of --split)",
        metavar="W PREFIX")
    split: str | None = option(None, "data", "train,valid[,test] weights of each corpus's "
                               "documents, e.g. 99,1 (the last documents validate)")
    tokenizer: str | None = option(None, "data", "the corpora's Hugging Face tokenizer (a "
                                   "directory or tokenizer.json); sets the model's vocab_size",
                                   metavar="PATH")
    document_masking: bool = option(True, "data", "keep the documents of a row apart: "
                                    "positions restart and no attention or label crosses a "
                                    "boundary (--no-document-masking: Megatron's default, one "
                                    "causal sequence per row)")
    data_workers: int = option(2, "data", "loader processes reading batches ahead (0: in the "
                               "training process)")
    data_cache_dir: str | None = option(None, "data", "where corpus index permutations are "
                                        "cached (default ~/.cache/eurocore/data-index)",
                                        metavar="DIR")
    markov_branching: int = option(4, "data", "successors per token in the synthetic source")
    data_seed: int = option(0, "data", "seed of the data order (and the synthetic source)")
    eval_every: int = option(100, "data", "validation every N steps and at the last (0: "
                             "never); needs validation data")
    eval_iters: int = option(10, "data", "validation batches, the same ones every time")
    # [checkpoint]
    checkpoint_dir: str | None = option(None, "checkpoint", "where checkpoints go (default "
                                        "OUTPUT_DIR/checkpoints; none without an output "
                                        "directory)", metavar="DIR")
    checkpoint_every: int = option(500, "checkpoint", "save every N steps and after the last "
                                   "(0: never)")
    keep_last: int = option(3, "checkpoint", "complete checkpoints kept, the newest (0: all)")
    resume: str = option("auto", "checkpoint", "auto (the newest intact checkpoint in the "
                         "checkpoint directory, if any), none, or PATH: a checkpoint (or a "
                         "checkpoint directory: the one its latest names) to start from",
                         metavar="auto|none|PATH")
    async_checkpoint: bool = option(False, "checkpoint", "write checkpoints in the background "
                                    "while training goes on (DCP async_save)")
    # [logging]
    log_every: int = option(10, "logging", "log every N steps (and the last)")
    output_dir: str | None = option(None, "logging", "the run's directory: its resolved "
                                    "config.toml (the command line's default: "
                                    "runs/<preset>-<date-time>)", metavar="DIR")
    metrics_json: str | None = option(None, "logging",
                                      "rank 0 writes the logged metrics here (a JSON list)",
                                      metavar="PATH")
    tensorboard: bool = option(True, "logging", "also write the logged metrics as TensorBoard "
                               "events in OUTPUT_DIR/tensorboard (when the tensorboard package "
                               "is installed; OUTPUT_DIR/metrics.jsonl is always written)")
    peak_tflops: float | None = option(None, "logging", "the device's peak TFLOP/s for MFU "
                                       "(default: the table's dense bf16 figure for known "
                                       "GPUs; none on CPUs)", metavar="TFLOPS")
    # [run]
    device: str = option("auto", "run", "auto (the local GPU if any), cpu or cuda",
                         choices=("auto", "cpu", "cuda"))
    bf16: bool | None = option(None, "run", "bf16 autocast: on, off, or auto (on GPUs only)")
    fused_loss: bool = option(True, "run", "the loss from the final hidden states in chunks of "
                              "tokens (eurocore.ops.linear_cross_entropy), never keeping the "
                              "(tokens x vocabulary) logits; off: from the logits")

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
        check_bool("tensorboard", self.tensorboard)
        if self.bf16 is not None:
            check_bool("bf16", self.bf16)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.peak_tflops is not None:
            check_number("peak_tflops", self.peak_tflops, minimum=0.0, inclusive=False)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_int("keep_last", self.keep_last, minimum=0)
        check_bool("async_checkpoint", self.async_checkpoint)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"resume: expected auto, none or a checkpoint directory, got "
                             f"{self.resume!r}")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ValueError(f"resume: {self.resume!r} is not a checkpoint directory (nor "
                             f"auto or none)")
        for name in ("metrics_json", "output_dir", "tokenizer", "data_cache_dir", "split",
                     "checkpoint_dir", "init_from_hf"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
        check_bool("document_masking", self.document_masking)
        check_int("data_workers", self.data_workers, minimum=0)
        check_int("eval_every", self.eval_every, minimum=0)
        check_int("eval_iters", self.eval_iters, minimum=1)
        self._check_data()
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
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute: expected one of {', '.join(RECOMPUTE)}, got "
                             f"{self.recompute!r}")
        if self.recompute_layers is not None:
            if not isinstance(self.recompute_layers, tuple):
                raise TypeError(f"recompute_layers: expected a tuple of ints, got "
                                f"{type(self.recompute_layers).__name__}")
            if self.recompute == "none":
                raise ValueError("recompute_layers: chooses layers for --recompute; "
                                 "recompute is none")
            for i in self.recompute_layers:
                check_int("recompute_layers", i, minimum=0, maximum=model.num_layers - 1)
        stages = self.pp * self.vpp
        if model.num_layers < stages:
            raise ValueError(f"{'vpp' if self.vpp > 1 else 'pp'}: {stages} pipeline stages "
                             f"need at least as many decoder layers, the model has "
                             f"{model.num_layers}")
        stage_layers(model.num_layers, stages, self.layers_per_stage)

    def _check_data(self) -> None:
        """The data options' syntax and files (a corpus's content is checked when the run's
        data is built: eurocore.train.trainer.build_source)."""
        for name in ("data_path", "valid_data_path"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, tuple):
                    raise TypeError(f"{name}: expected a tuple of strings, got "
                                    f"{type(value).__name__}")
                parse_data_path(value, name)
        if (self.valid_data_path or self.split) and self.data_path is None:
            which = "valid_data_path" if self.valid_data_path else "split"
            raise ValueError(f"{which}: validation data needs training corpora (data_path)")
        if self.split is not None:
            parse_split(self.split)
        if self.tokenizer is not None:
            tokenizer_file(self.tokenizer)

    def model_config(self) -> ModelConfig:
        """The model: ``init_from_hf``'s config.json when set, else the preset with
        ``model_overrides`` and ``num_layers`` applied, and the tokenizer's vocabulary size
        unless an override sets ``vocab_size``."""
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides: expected a dict, got "
                            f"{type(self.model_overrides).__name__}")
        overrides = dict(self.model_overrides)
        if self.num_layers is not None:
            overrides["num_layers"] = self.num_layers
        if self.init_from_hf is not None:
            from eurocore.train.hf import model_config_from_hf

            if overrides:  # the checkpoint's weights fix the shapes
                name = "num_layers" if self.num_layers is not None else "model_overrides"
                raise ValueError(f"{name}: the model of init_from_hf is its config.json's; "
                                 f"it takes no overrides ({sorted(overrides)})")
            model = model_config_from_hf(self.init_from_hf)
            if self.tokenizer is not None and _tokenizer_vocab(self.tokenizer) > model.vocab_size:
                raise ValueError(f"tokenizer: {self.tokenizer!r} has "
                                 f"{_tokenizer_vocab(self.tokenizer)} tokens, more than the "
                                 f"vocab_size {model.vocab_size} of init_from_hf's model")
            return model
        if self.tokenizer is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = _tokenizer_vocab(self.tokenizer)
        return preset(self.preset, **overrides)

    def recomputed_layers(self) -> tuple[int, ...]:
        """The decoder layers whose activations are recomputed (global indices)."""
        if self.recompute == "none":
            return ()
        if self.recompute_layers is not None:
            return self.recompute_layers
        return tuple(range(self.model_config().num_layers))

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


# Fields holding paths (data_path's weights stay as they are).
PATH_FIELDS = ("tokenizer", "data_path", "valid_data_path", "data_cache_dir", "metrics_json",
               "output_dir", "checkpoint_dir", "init_from_hf")


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with every path absolute, so that its config.toml means the same read
    from any directory."""
    changes: dict[str, Any] = {}
    for name in PATH_FIELDS:
        value = getattr(config, name)
        if isinstance(value, tuple):
            changes[name] = tuple(item if _is_weight(item) else os.path.abspath(item)
                                  for item in value)
        elif value is not None:
            changes[name] = os.path.abspath(value)
    if config.resume not in ("auto", "none"):
        changes["resume"] = os.path.abspath(config.resume)
    return dataclasses.replace(config, **changes)


def _is_weight(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _tokenizer_vocab(path: str) -> int:
    return load_tokenizer(path).get_vocab_size(with_added_tokens=True)


@dataclass(frozen=True)
class RunLayout:
    """What :meth:`TrainConfig.layout` derives from the world size: data-parallel replicas,
    sequences per replica and per microbatch, microbatches per step, the schedule."""

    dp: int
    per_replica: int
    micro_batch_size: int
    num_microbatches: int
    schedule: str


# -------------------------------------------------------------------------------------------
# The fields' own descriptions: types, sections, flags
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One TrainConfig field as the command line and the file see it."""

    name: str
    kind: str  # "bool", "int", "float", "str", "ints" (tuple of ints), "strs", "dict"
    optional: bool  # None is a value (and the default's meaning is in the help)
    default: Any
    section: str
    help: str
    flags: tuple[str, ...]
    choices: tuple[str, ...] | None
    metavar: str | None
    cli: bool


def field_specs() -> list[FieldSpec]:
    """Every TrainConfig field, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in dataclasses.fields(TrainConfig):
        kind, optional = _kind(hints[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        specs.append(FieldSpec(f.name, kind, optional, default, meta["section"], meta["help"],
                               (flag, *meta["aliases"]), meta["choices"], meta["metavar"],
                               meta["cli"]))
    return specs


def _kind(annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation in (bool, int, float, str):
        return annotation.__name__, optional
    origin, inner = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and inner[0] is int:
        return "ints", optional
    if origin is tuple and inner[0] is str:
        return "strs", optional
    if origin is dict:
        return "dict", optional
    raise TypeError(f"TrainConfig: no command-line form for {annotation!r}")


# -------------------------------------------------------------------------------------------
# TOML files
# -------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
                ) -> TrainConfig:
    """The TrainConfig of the TOML file at ``path`` (None: the defaults) with ``overrides``
    (field name -> value: command-line flags) on top.

    Raises:
        ValueError: the file is missing or not TOML, a section or key is unknown (the
            closest valid one suggested), or a value has the wrong type; the message names
            the file and the key. Then every field check of TrainConfig.
    """
    values = read_config_file(path) if path is not None else {}
    from_file = set(values) | set(values.get("model_overrides", {}))
    values.update(overrides or {})
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as err:
        name, sep, rest = str(err).partition(": ")
        if sep and name in from_file and name not in (overrides or {}):  # the file said it
            section = next((spec.section for spec in field_specs() if spec.name == name),
                           "model")
            raise type(err)(f"config: {section}.{name} in {str(path)!r}: {rest}") from None
        if path is not None and from_file:  # a check across fields: name the file too
            raise type(err)(f"{err} (other settings from {str(path)!r})") from None
        raise


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields a TOML file sets, checked for names and types (see :func:`load_config`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config: {str(path)!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"config: cannot read {str(path)!r} ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config: {str(path)!r} is not valid TOML: {err}") from None
    specs = {spec.name: spec for spec in field_specs()}
    by_section: dict[str, dict[str, FieldSpec]] = {s: {} for s in SECTIONS}
    for spec in specs.values():
        by_section[spec.section][spec.name] = spec
    values: dict[str, Any] = {}
    model_kinds = _model_kinds()
    model_fields = set(model_kinds)
    for section, table in document.items():
        where = f"{str(path)!r}"
        if section not in by_section:
            raise ValueError(f"config: unknown section [{section}] in {where}"
                             f"{_suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ValueError(f"config: {section} in {where} must be a [{section}] table")
        for key, value in table.items():
            spec = by_section[section].get(key)
            if spec is None and section == "model" and key in model_fields:
                kind = model_kinds[key]
                model_spec = FieldSpec(key, kind[0], kind[1], None, "model", "", (), None,
                                       None, False)
                values.setdefault("model_overrides", {})[key] = _from_toml(
                    model_spec, value, f"{section}.{key} in {where}")
                continue
            if spec is None:
                known = [*by_section[section], *(model_fields if section == "model" else ())]
                elsewhere = [s.section for s in specs.values() if s.name == key]
                hint = (f" (it belongs in [{elsewhere[0]}])" if elsewhere
                        else _suggest(key, known))
                raise ValueError(f"config: unknown key {section}.{key} in {where}{hint}")
            values[key] = _from_toml(spec, value, f"{section}.{key} in {where}")
    return values


def _model_kinds() -> dict[str, tuple[str, bool]]:
    """ModelConfig's fields as (kind, optional), for the [model] section's overrides."""
    hints = typing.get_type_hints(ModelConfig)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(ModelConfig)}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _from_toml(spec: FieldSpec, value: Any, where: str) -> Any:
    """``value`` as the field's type; ValueError naming ``where`` otherwise."""
    expected = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string",
                "ints": "an array of integers", "strs": "an array of strings",
                "dict": "a table"}[spec.kind]
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str),
          "ints": isinstance(value, list) and all(isinstance(v, int) and
                                                  not isinstance(v, bool) for v in value),
          "strs": isinstance(value, list) and all(isinstance(v, (str, int, float)) and
                                                  not isinstance(v, bool) for v in value),
          "dict": isinstance(value, dict)}[spec.kind]
    if not ok:
        raise ValueError(f"config: {where} must be {expected}, got {value!r}")
    if spec.kind == "float":
        return float(value)
    if spec.kind == "ints":
        return tuple(value)
    if spec.kind == "strs":
        return tuple(str(v) for v in value)
    return value


def to_toml(config: TrainConfig) -> str:
    """The config as a TOML file that :func:`load_config` reads back to an equal config
    (fields left at None are omitted: None is their default)."""
    specs = field_specs()
    lines = ["# eurocore run configuration (written by eurocore; --config reads it)"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for spec in (s for s in specs if s.section == section):
            value = getattr(config, spec.name)
            if spec.kind == "dict":
                lines += [f"{key} = {_toml_value(v)}" for key, v in sorted(value.items())
                          if v is not None]
            elif value is not None:
                lines.append(f"{spec.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value)
                                                        else "inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"config: no TOML form for {value!r}")
