"""Hugging Face Llama-family checkpoints: import into any layout, export from any checkpoint.

A eurocore checkpoint stores one canonical model (``eurocore.train.checkpoint``): each weight
under its layer's name and full shape, fused q/k/v and gate/up as their parts, the
vocabulary unpadded. HF's ``LlamaForCausalLM`` stores the same tensors, so import and export
are a renaming (:data:`HF_NAMES`) plus a check of ``config.json``:

==========================================  ==============================================
eurocore (canonical)                        Hugging Face
==========================================  ==============================================
``embedding.weight``                        ``model.embed_tokens.weight``
``layers.{i}.attention_norm.weight``        ``model.layers.{i}.input_layernorm.weight``
``layers.{i}.attention.{q,k,v}.weight``     ``model.layers.{i}.self_attn.{q,k,v}_proj.weight``
``layers.{i}.attention.out.weight``         ``model.layers.{i}.self_attn.o_proj.weight``
``layers.{i}.mlp_norm.weight``              ``model.layers.{i}.post_attention_layernorm.weight``
``layers.{i}.mlp.{gate,up,down}.weight``    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``
``norm.weight``                             ``model.norm.weight``
``head.weight`` (untied only)               ``lm_head.weight``
==========================================  ==============================================

Conventions, none of which needs a permutation:

- Rotary: HF's Llama stores q and k for the rotate-half RoPE (its converter permuted
  Meta's interleaved weights once), which is eurocore's convention.
- Fused q/k/v and gate/up: eurocore fuses them per TP rank at run time (each rank's rows of
  each part); a checkpoint and HF both hold the parts, so GQA groups stay whole per rank.
- Vocabulary: eurocore pads it to a multiple of TP inside the model only.

Import (:func:`load_hf_weights`) reads through safetensors' lazy slices: each rank reads only
the rows and columns of each tensor it holds (its TP slice, its FSDP rows), never a whole
matrix. Export (:func:`export_hf`) streams a checkpoint shard by shard into safetensors
files, ``model.safetensors.index.json``, ``config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from eurocore.model import ModelConfig
from eurocore.train.checkpoint import (
    TensorBox,
    layout_free_tensors,
    quiet_without_process_group,
    resolve_checkpoint,
    verify,
)
from eurocore.utils.files import (
    fsync_path,
    read_json,
    write_json_atomically,
)

# Canonical name pattern -> HF name pattern ({i}: the layer).
HF_NAMES: dict[str, str] = {
    "embedding.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
# config.json fields that must have these values: eurocore's model has no other form.
REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# config.json fields of model kinds eurocore does not build (mixtures of experts).
UNSUPPORTED_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_layer_freq")
# Tensors an HF checkpoint may hold that are not weights (older Llama exports' RoPE tables).
NOT_WEIGHTS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_name(canonical: str) -> str:
    """The HF name of a canonical weight name (KeyError if it has none)."""
    layer = re.match(r"^layers\.(\d+)\.(.+)$", canonical)
    if layer:
        return HF_NAMES[f"layers.{{i}}.{layer.group(2)}"].format(i=layer.group(1))
    return HF_NAMES[canonical]


# --- config.json ------------------------------------------------------------------------------


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict; ValueError naming the file when it is missing
    or not JSON."""
    file = Path(directory) / "config.json"
    config = read_json(file, "init_from_hf", f"{str(directory)!r} is not a Hugging Face model "
                       f"directory")
    if not isinstance(config, dict):
        raise ValueError(f"init_from_hf: {str(file)!r} is not a JSON object")
    return config


def model_config_from_hf(directory: str | Path, seed: int = 1234) -> ModelConfig:
    """The :class:`ModelConfig` of the HF model in ``directory`` (its ``config.json``).

    Raises ValueError naming the field (and the file) for what eurocore does not build: an
    architecture other than Llama or Mistral, biases, an activation other than SiLU, a
    sliding window, mixtures of experts, a ``head_dim`` other than hidden / heads, or an
    unknown ``rope_type``.
    """
    config = read_hf_config(directory)
    file = str(Path(directory) / "config.json")

    def fail(field: str, why: str) -> ValueError:
        return ValueError(f"{field}: {why} (in {file!r}); eurocore builds Llama-style decoders "
                          f"only")

    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise fail("architectures", f"{architectures} is not one of {list(ARCHITECTURES)}")
    for field, value in REQUIRED.items():
        if config.get(field, value) != value:
            raise fail(field, f"{config[field]!r} is not supported, only {value!r}")
    # transformers' MistralConfig applies a 4096-token window when the key is absent
    window = config.get("sliding_window", 4096 if architectures[0] == "MistralForCausalLM"
                        else None)
    if window is not None:
        raise fail("sliding_window", f"{window} is set (or MistralConfig's default); a sliding "
                   "window is not supported")
    if config.get("attention_dropout", 0.0) not in (0, 0.0, None):
        raise fail("attention_dropout", f"{config['attention_dropout']} is not supported, "
                   "only 0.0")
    rope_parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    for where in (config, rope_parameters):
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            raise fail("partial_rotary_factor", f"{where['partial_rotary_factor']} is not "
                       "supported, only 1.0 (every dimension rotated)")
    for field in UNSUPPORTED_FIELDS:
        if config.get(field):
            raise fail(field, "a mixture of experts is not supported")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        fields = {"vocab_size": int(config["vocab_size"]), "hidden_size": hidden,
                  "num_layers": int(config["num_hidden_layers"]), "num_heads": heads,
                  "num_kv_heads": int(config.get("num_key_value_heads") or heads),
                  "ffn_hidden_size": int(config["intermediate_size"]),
                  "max_seq_len": int(config.get("max_position_embeddings", 4096))}
    except KeyError as err:
        raise fail(err.args[0], "missing") from None
    except (TypeError, ValueError) as err:  # null or not a number
        raise fail("config.json", f"a size is not an integer ({err})") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise fail("head_dim", f"{head_dim} is not hidden_size / num_attention_heads = "
                   f"{hidden // heads}")
    theta, scaling = _rope(config)
    try:
        return ModelConfig(**fields, rope_theta=theta, rope_scaling=scaling,
                           norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                           init_std=float(config.get("initializer_range", 0.02)), seed=seed)
    except (TypeError, ValueError) as err:
        field = str(err).split(":", 1)[0]
        raise ValueError(f"{err} (in {file!r}, from its {_HF_FIELD.get(field, field)})") from None


_HF_FIELD = {"rope_scaling": "rope_scaling / rope_parameters", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "ffn_hidden_size": "intermediate_size", "norm_eps": "rms_norm_eps"}


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` and ``rope_scaling``."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params = dict(params)
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (None if kind == "default" else params)


def hf_config(model: ModelConfig, dtype: torch.dtype = torch.float32,
              tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``model`` as ``LlamaForCausalLM`` (rope in the
    ``rope_theta`` / ``rope_scaling`` keys every transformers from 4.45 reads), with the
    special token ids of ``tokens`` (bos, eos, pad; null where unknown, never
    transformers' defaults of 1 and 2)."""
    scaling = dict(model.rope_scaling) if model.rope_scaling else None
    theta = scaling.pop("rope_theta", model.rope_theta) if scaling else model.rope_theta
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim, "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps, "rope_theta": theta,
        "rope_scaling": scaling, "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "initializer_range": model.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    for name in TOKEN_IDS:
        config[name] = (tokens or {}).get(name)
    return config


def special_tokens(directory: str | Path) -> dict[str, Any]:
    """The special token ids of the HF model in ``directory`` (config.json's, and its
    generation_config.json, if any), for an export to carry over."""
    config = read_hf_config(directory)
    tokens: dict[str, Any] = {name: config.get(name) for name in TOKEN_IDS}
    generation = Path(directory) / "generation_config.json"
    if generation.is_file():
        tokens["generation_config"] = read_json(generation, "init_from_hf", "")
    return tokens


# --- reading safetensors ----------------------------------------------------------------------


class HFWeights:
    """The tensors of an HF model directory (``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists), read lazily: :meth:`read` returns one box of a
    tensor, reading only its bytes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"init_from_hf: {str(index)!r} is not a safetensors index "
                                 f"({err})") from None
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_FILE).exists():
            with _safetensors_errors(self.directory / SINGLE_FILE), \
                    _safe_open(self.directory / SINGLE_FILE) as f:
                self.files = {name: self.directory / SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"init_from_hf: {str(self.directory)!r} holds neither {INDEX_FILE} "
                             f"nor {SINGLE_FILE} (only safetensors checkpoints are read)")
        self._open: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (ValueError naming it when it is missing)."""
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The box of tensor ``name`` at ``offsets`` of ``sizes``: only its bytes are read."""
        index = tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))
        with _safetensors_errors(self.files.get(name), name):
            return self._slice(name)[index]

    def _slice(self, name: str) -> Any:
        file = self.files.get(name)
        if file is None:
            raise ValueError(f"{name}: missing from the checkpoint in {str(self.directory)!r}")
        with _safetensors_errors(file, name):
            if file not in self._open:
                if not file.exists():
                    raise ValueError(f"{name}: its file {str(file)!r} is missing")
                self._open[file] = self._stack.enter_context(_safe_open(file))
            return self._open[file].get_slice(name)


def _safe_open(file: Path) -> Any:
    from safetensors import safe_open

    return safe_open(file, framework="pt")


@contextlib.contextmanager
def _safetensors_errors(file: Path | None, name: str | None = None) -> Iterator[None]:
    """safetensors' own errors (a truncated or corrupt file, a tensor its header lacks) as
    ValueErrors naming the tensor and the file."""
    try:
        yield
    except ValueError:
        raise
    except Exception as err:  # SafetensorError derives from Exception only
        what = f"{name}: " if name else ""
        raise ValueError(f"{what}{str(file)!r} is not a readable safetensors file ({err})"
                         ) from None


# --- import -----------------------------------------------------------------------------------


def check_model_matches(model: ModelConfig, directory: str | Path) -> None:
    """Raises ValueError naming the field when ``model`` is not the model in ``directory``
    (what :func:`model_config_from_hf` derives; seed and init_std aside)."""
    theirs = model_config_from_hf(directory, seed=model.seed)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "ffn_hidden_size", "rope_theta", "rope_scaling", "norm_eps",
                  "tie_embeddings"):
        if getattr(model, field) != getattr(theirs, field):
            raise ValueError(f"{field}: the model has {getattr(model, field)!r}, the HF "
                             f"checkpoint in {str(directory)!r} {getattr(theirs, field)!r}")


@torch.no_grad()
def load_hf_weights(chunks: Sequence[torch.nn.Module], directory: str | Path) -> int:
    """Fills this rank's model chunks (``LlamaModel`` s in any TP/PP/DP layout, FSDP2-wrapped
    or not) with the HF checkpoint in ``directory``; returns the elements read.

    Each weight's box (its TP slice and FSDP rows) is read alone, through safetensors' lazy
    slicing, and cast to the parameter's dtype. Raises ValueError naming the field or the
    tensor: a model other than the checkpoint's, a missing tensor, a shape other than the
    config says, or (on every rank alike) a tensor the model has no place for.
    """
    check_model_matches(chunks[0].config, directory)
    read = 0
    with HFWeights(directory) as weights:
        expected = {hf_name(n) for n in _hf_order(chunks[0].config)}
        unexpected = sorted(n for n in weights.files if n not in expected
                            and not NOT_WEIGHTS.match(n))
        if unexpected:
            raise ValueError(f"{unexpected[0]}: the HF checkpoint holds tensors the model has "
                             f"no place for ({len(unexpected)}: {', '.join(unexpected[:5])})")
        for theirs, shape in hf_shapes(chunks[0].config).items():  # every rank, every one
            if weights.shape(theirs) != shape:
                raise ValueError(f"{theirs}: shape {list(weights.shape(theirs))} in the HF "
                                 f"checkpoint, {list(shape)} by its config.json")
        for name, box in _model_boxes(chunks).items():  # shapes checked above
            piece = weights.read(hf_name(name), box.offsets, box.local.shape)
            box.local.copy_(piece)
            read += piece.numel()
    return read


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``model`` and its full shape."""
    h, kv, f = model.hidden_size, model.num_kv_heads * model.head_dim, model.ffn_hidden_size
    by_part = {"attention_norm.weight": (h,), "attention.q.weight": (h, h),
               "attention.k.weight": (kv, h), "attention.v.weight": (kv, h),
               "attention.out.weight": (h, h), "mlp_norm.weight": (h,),
               "mlp.gate.weight": (f, h), "mlp.up.weight": (f, h), "mlp.down.weight": (h, f),
               "embedding.weight": (model.vocab_size, h), "norm.weight": (h,),
               "head.weight": (model.vocab_size, h)}
    return {hf_name(n): by_part[n.split(".", 2)[2] if n.startswith("layers.") else n]
            for n in _hf_order(model)}


def _model_boxes(chunks: Sequence[torch.nn.Module]) -> dict[str, TensorBox]:
    return {name.removeprefix("model."): box
            for name, box in layout_free_tensors(list(chunks)).items()}


# --- export -----------------------------------------------------------------------------------


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
              tokenizer: str | Path | None = None, max_shard_bytes: int = 5 * 10**9,
              log: Any = print) -> Path:
    """Writes the model of a eurocore checkpoint as an HF ``LlamaForCausalLM`` directory.

    Args:
        checkpoint: a checkpoint (``step-N``) or a checkpoint directory (the one its
            ``latest`` names), in any layout; verified (sizes, CRC-32) first.
        out_dir: the new model directory (must not exist, or be empty); written as
            ``out_dir.tmp-export``, every file fsynced, and renamed when complete.
        dtype: the stored dtype of every weight (the checkpoint's are float32).
        tokenizer: a directory whose tokenizer files are copied (optional): its vocabulary
            must fit the model's, and its end-of-sequence token goes into the configs.
        max_shard_bytes: the largest safetensors file (a tensor larger than this gets a file
            of its own).
        log: where progress lines go.

    Returns:
        ``out_dir``. One file's tensors in ``dtype`` and one float32 tensor are in memory at
        a time. The special token ids are the HF model's a run started from
        (``init_from_hf``), else the tokenizer's end of sequence, else null.
    """
    from safetensors.torch import save_file

    path = resolve_checkpoint(checkpoint)
    info = verify(path)
    try:
        model = ModelConfig(**info["meta"]["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint: {str(path)!r} records no valid model ({err})") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir: {str(out_dir)!r} exists and is not an empty directory")
    tokens = dict(info["meta"].get("hf_tokens") or {})
    if tokenizer is not None:
        tokens.update(_tokenizer_tokens(Path(tokenizer), model))
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = _hf_order(model)
    missing = [n for n in names if f"model.{n}" not in stored]
    if missing:
        raise ValueError(f"checkpoint: {str(path)!r} lacks model.{missing[0]}")
    shards = list(_shards(names, stored, dtype, max_shard_bytes))
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    if tmp.exists():
        log(f"export: removing {str(tmp)!r}, left by an export that did not finish")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file = (SINGLE_FILE if len(shards) == 1 else
                f"model-{number:05d}-of-{len(shards):05d}.safetensors")
        tensors = {hf_name(n): _load(path, f"model.{n}", stored).to(dtype).contiguous()
                   for n in shard}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        fsync_path(tmp / file)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        weight_map.update(dict.fromkeys(tensors, file))
        log(f"export: {file} ({len(tensors)} tensors, {nbytes / 2**20:.1f} MiB)")
        del tensors
    if len(shards) > 1:
        write_json_atomically({"metadata": {"total_size": total}, "weight_map": weight_map},
                              tmp / INDEX_FILE, durable=True)
    generation = dict(tokens.pop("generation_config", None) or {"_from_model_config": True})
    generation.update({k: v for k, v in tokens.items() if v is not None})
    write_json_atomically(hf_config(model, dtype, tokens), tmp / "config.json", durable=True)
    write_json_atomically(generation, tmp / "generation_config.json", durable=True)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer) / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
                fsync_path(tmp / name)
    fsync_path(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    fsync_path(out_dir.parent)
    log(f"export: step {info['step']} of {str(path)!r} written to {str(out_dir)!r}")
    return out_dir


def _tokenizer_tokens(directory: Path, model: ModelConfig) -> dict[str, Any]:
    """The end-of-sequence id of the tokenizer in ``directory``; ValueError naming
    ``tokenizer`` when it is not a directory or its vocabulary exceeds the model's."""
    from eurocore.data.tokenizer import load_tokenizer, tokenizer_info

    if not directory.is_dir():
        raise ValueError(f"tokenizer: {str(directory)!r} is not a directory of tokenizer files")
    size = load_tokenizer(str(directory)).get_vocab_size(with_added_tokens=True)
    if size > model.vocab_size:
        raise ValueError(f"tokenizer: {str(directory)!r} has {size} tokens, more than the "
                         f"model's vocab_size {model.vocab_size}")
    return {"eos_token_id": tokenizer_info(str(directory)).eos_id}


def _load(path: Path, name: str, stored: dict[str, Any]) -> torch.Tensor:
    """One whole tensor of the checkpoint at ``path``, float32."""
    state = {name: torch.empty(tuple(stored[name].size), dtype=torch.float32)}
    with quiet_without_process_group():
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state[name]


def _hf_order(model: ModelConfig) -> list[str]:
    """Canonical names in the order HF lists them: embeddings, layers, norm, head."""
    names = ["embedding.weight"]
    for i in range(model.num_layers):
        names += [p.format(i=i) for p in HF_NAMES if p.startswith("layers.")]
    names.append("norm.weight")
    if not model.tie_embeddings:
        names.append("head.weight")
    return names


def _shards(names: list[str], stored: dict[str, Any], dtype: torch.dtype,
            max_bytes: int) -> Iterator[list[str]]:
    """``names`` in runs whose ``dtype`` bytes stay within ``max_bytes`` (a larger tensor
    alone)."""
    shard: list[str] = []
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name in names:
        nbytes = torch.Size(stored[f"model.{name}"].size).numel() * itemsize
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(name)
        size += nbytes
    if shard:
        yield shard
