"""Hugging Face transformers' Llama and Mistral models on eurocore kernels, patched in place.

    import torch
    from transformers import AutoModelForCausalLM
    from eurocore.integrations.transformers import apply_eurocore_to_llama

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    apply_eurocore_to_llama(model)  # this model: RMSNorm, rotary embedding and attention
    # or, before building: apply_eurocore_to_llama() patches every Llama built afterwards

Written for transformers 5.x and tested with 5.24.0. A transformers without the mask
registry it relies on (``transformers.masking_utils.AttentionMaskInterface``, added in 4.53)
is refused with an ImportError; 4.53 to 4.57 are untested.

What is replaced
----------------
- **RMSNorm**: every ``LlamaRMSNorm`` / ``MistralRMSNorm`` becomes an
  :class:`eurocore.nn.LlamaRMSNorm` that holds the *same* ``weight`` Parameter (optimizer
  references and the state dict stay valid) and eps. Its output is rounded to the input's
  dtype; HF's promotes to the weight's dtype when the two differ (an fp32 weight on bf16
  activations), the one case where the dtypes of the results differ.
- **Rotary**: ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` of the model's
  ``modeling_llama`` / ``modeling_mistral`` module becomes :func:`eurocore.ops.apply_rotary`
  (rotate-half pairs, q and k in one launch) with HF's own ``cos``/``sin`` as the table: they
  are (batch or 1, seq, head_dim), the half-width table duplicated (``cat((c, c), -1)``, times
  the rope type's ``attention_scaling``), so their first half is read at each token's row
  and every rope type HF computes is served as it is. The rotation is done in fp32 and
  rounded once (HF rounds each product in the input's dtype). Calls of any other form
  (another ``unsqueeze_dim``, a cos/sin that is not (batch, seq, head_dim), or one that
  requires grad) go to HF's function: the arithmetic is the same.
- **Attention**: :func:`eurocore_attention_forward` is registered under the name
  ``"eurocore"`` with ``transformers.AttentionInterface`` (and HF's flash-attention mask
  builder under the same name with ``AttentionMaskInterface``), and the model's
  ``config._attn_implementation`` is set to it (``model.set_attn_implementation``). A model
  can also ask for it at load: ``from_pretrained(..., attn_implementation="eurocore")``
  after any ``apply_eurocore_to_*`` call with ``attention=True``.

Instance or class
-----------------
``apply_eurocore_to_llama(model)`` replaces that model's norm modules and switches its
attention; ``apply_eurocore_to_llama()`` (no model) replaces ``modeling_llama.LlamaRMSNorm``
and makes models built afterwards default to ``"eurocore"`` attention (an explicit
``attn_implementation`` still wins). The rotary function is a module global that HF's
attention layers look up at each call, so it is replaced module-wide in both modes: every
model of that family then uses it, which changes no result beyond rounding. Patching twice
is harmless (the originals are kept once); :func:`revert_eurocore_patch` restores them
exactly, and given a model also puts back that model's own norm modules and attention
implementation. Patch before wrapping the model (DDP, FSDP, ``torch.compile``) and before
registering hooks on its norms: the norm modules are new objects.

Masks (the padding decision)
----------------------------
The "eurocore" mask builder is HF's flash-attention one, so the attention function receives
the 2-D padding mask (batch, kv_len), bool, or None, never a 4-D mask built by HF:

- **None**: the fixed-length path, causal and bottom-right aligned (a query block at the end
  of a KV cache); or, when ``position_ids`` restart inside a row (sequences packed without
  padding, as HF's ``DataCollatorWithFlattening`` makes them) or the flash-attention kwargs
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` are given, the varlen path over those
  documents. HF's sdpa mask does the same for packed rows only without a KV cache
  (``use_cache=False``, as in training); with one it lets the documents see each other.
  eurocore, which cannot see the cache, always keeps them apart, as HF's flash-attention
  path does.
- **2-D**: right or left padding becomes the varlen path: the real tokens are gathered into
  one packed sequence with ``cu_seqlens``, attended, and scattered back; padded query rows
  get a zero attention output (their logits mean nothing with sdpa either, and a loss with
  label -100 there ignores them). With a KV cache the queries
  are the last tokens of each row (left padding, as in generation). Padding in the middle
  of a row is compacted, which keeps causal attention exact but would shorten a sliding
  window across the hole.
- **Any other mask** (a 4-D tensor or a flex-attention ``BlockMask`` passed straight through
  by the user) raises ``ValueError``: eurocore cannot tell a causal mask from any other
  without reading it, and a silent fallback to sdpa would hide a slow path (eurocore never
  falls back from an explicit choice).

The unpadding plan (indices, ``cu_seqlens``, longest sequence) and the packed-sequence
check each read the device once per forward: the plan is computed for the first layer and
reused by the others while the mask (or ``position_ids``) is the same unmodified tensor.

Sliding window
--------------
HF's sliding-window mask lets query i see key j when ``i - sliding_window < j <= i``: the
query and the ``sliding_window - 1`` keys before it. eurocore's ``window_size=(left, right)``
lets it see ``i - left <= j <= i + right``, so a config with ``sliding_window = w`` runs
with ``window_size=(w - 1, 0)`` (causal); HF's flash-attention path passes the same.

Not supported
-------------
Attention dropout (``attention_dropout > 0`` in training raises), attention sinks
(``s_aux``), ``output_attentions`` (the weights are None, as with sdpa), masks other than
the above, a ``head_dim`` the Triton attention kernel cannot take (it takes multiples of 8
up to 256), and families other than Llama and Mistral. ``torch.compile``, ``StaticCache`` and tensor
parallelism of transformers are untested.

Backends: each op chooses its backend per call (:mod:`eurocore.ops.backends`): Triton on
GPUs, the torch reference for CPU tensors unless ``EUROCORE_BACKEND`` says otherwise.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from eurocore.nn import LlamaRMSNorm as EurocoreRMSNorm
from eurocore.ops import apply_rotary, flash_attention, flash_attention_varlen
from eurocore.utils.checks import check_bool

ATTN_IMPLEMENTATION = "eurocore"

# model_type -> (modeling module, its RMSNorm class, its PreTrainedModel class)
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaPreTrainedModel"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm",
                "MistralPreTrainedModel"),
}
# The attributes patched, (owner, name) -> (owner, name, was in owner.__dict__, original).
_ORIGINALS: dict[tuple[int, str], tuple[Any, str, bool, Any]] = {}
# Instance attributes set on patched models and the norm modules that replace HF's.
_ATTN_ORIGINAL = "_eurocore_original_attn_implementation"
_NORM_ORIGINAL = "_eurocore_original_module"
_HF_DEFAULT = "<transformers' default>"


# -------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------


def apply_eurocore_to_llama(
    model: nn.Module | None = None,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    attention: bool = True,
) -> nn.Module | None:
    """Runs a Hugging Face Llama model's RMSNorm, rotary embedding and attention on eurocore.

    Args:
        model: a Llama-family model instance (``LlamaForCausalLM``, ``LlamaModel``, or a
            ``Mistral*`` one: the family is read from ``model.config.model_type``), patched
            in place; None patches ``transformers.models.llama.modeling_llama`` so that
            models built afterwards use eurocore.
        rms_norm: replace the RMSNorm modules (class) by :class:`eurocore.nn.LlamaRMSNorm`.
        rope: replace ``apply_rotary_pos_emb`` of the family's modeling module (module-wide
            in both modes: HF looks it up as a module global).
        attention: register the ``"eurocore"`` attention and switch the model to it (with
            None: make it the default of models built afterwards).

    Each switch patches, False leaves that part as it is (it does not undo an earlier
    patch: :func:`revert_eurocore_patch` does). Patching again is harmless.

    Returns:
        ``model``.

    Raises:
        ValueError: the model is not of a supported family.
        TypeError: a switch is not a bool.
        ImportError: transformers is missing or older than 4.53.
    """
    return _apply("llama", model, rms_norm=rms_norm, rope=rope, attention=attention)


def apply_eurocore_to_mistral(
    model: nn.Module | None = None,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    attention: bool = True,
) -> nn.Module | None:
    """:func:`apply_eurocore_to_llama` for Mistral: with None it patches
    ``transformers.models.mistral.modeling_mistral``. A config's ``sliding_window = w``
    runs as eurocore's ``window_size=(w - 1, 0)``: the query and the w - 1 keys before it."""
    return _apply("mistral", model, rms_norm=rms_norm, rope=rope, attention=attention)


def revert_eurocore_patch(model: nn.Module | None = None) -> nn.Module | None:
    """Undoes every ``apply_eurocore_to_*`` patch of transformers' modules and classes,
    restoring the original objects themselves.

    Args:
        model: also restore this model: its norm modules become HF's again (the very
            modules that were replaced, holding the current weight; norms built while a
            class patch was active become new HF modules holding the same weight) and its
            attention implementation goes back to the one it had (transformers' default
            for a model built under a class patch).

    The ``"eurocore"`` attention stays registered, so models not given here that still
    ask for it keep working.

    Returns:
        ``model``.
    """
    for owner, name, owned, original in reversed(list(_ORIGINALS.values())):
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    _ORIGINALS.clear()
    if model is not None:
        _revert_norms(model)
        _revert_attention(model)
    return model


def eurocore_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"eurocore"`` entry of ``transformers.AttentionInterface``: HF's attention-function
    signature over :func:`eurocore.ops.flash_attention` / ``flash_attention_varlen``.

    Args:
        module: the calling attention layer (its ``is_causal`` is the default of is_causal).
        query: (batch, heads, seq_q, head_dim), float16, bfloat16 or float32.
        key, value: (batch, kv_heads, seq_k, head_dim), query's dtype; heads divisible by
            kv_heads (GQA is native, no repeat).
        attention_mask: None, or the 2-D padding mask (batch, seq_k), True / 1 at real tokens
            (see the module docstring; any other mask raises ValueError).
        dropout: must be 0.
        scaling: softmax scale, None for 1 / sqrt(head_dim).
        sliding_window: w keeps the query and the w - 1 keys before it.
        softcap: > 0 caps the scores to ``softcap · tanh(s / softcap)``.
        is_causal: None takes ``module.is_causal`` (True when absent).
        kwargs: ``position_ids`` (batch or 1, seq_q) to detect packed sequences, or
            ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k`` for
            sequences packed along each row; others are ignored.

    Returns:
        ``(out, None)``: out (batch, seq_q, heads, head_dim) in query's dtype.
    """
    if dropout:
        raise ValueError(f"dropout: eurocore attention has no dropout, got {dropout}; set "
                         f"config.attention_dropout = 0.0 or use another attn_implementation")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: eurocore attention has no attention sinks")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    options: dict[str, Any] = dict(
        causal=causal, softmax_scale=scaling, window_size=_window_size(sliding_window, causal),
        softcap=0.0 if softcap is None else float(softcap))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, seq_q = q.shape[:2]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(getattr(attention_mask, "shape", ()))
            raise ValueError(
                f"attention_mask: eurocore attention takes the 2-D padding mask (batch, "
                f"kv_len) or None, got a {type(attention_mask).__name__} of shape {shape}; a "
                f"4-D or custom mask needs attn_implementation='sdpa' or 'eager'")
        return _attend_padded(q, k, v, attention_mask, options), None
    packed = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                            "max_length_k")]
    if all(x is not None for x in packed):
        cu_q, cu_k, max_q, max_k = packed
        return _attend_flat(q, k, v, cu_q, cu_k, int(max_q), int(max_k), options), None
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and seq_q == k.shape[1] > 1:
        plan = _POSITIONS.get(position_ids, (batch, seq_q),
                              lambda: _packed_plan(position_ids, batch, seq_q))
        if plan is not None:
            cu, longest = plan
            return _attend_flat(q, k, v, cu, cu, longest, longest, options), None
    return flash_attention(q, k, v, **options), None


# -------------------------------------------------------------------------------------------
# Patching
# -------------------------------------------------------------------------------------------


def _apply(family: str, model: nn.Module | None, *, rms_norm: bool, rope: bool,
           attention: bool) -> nn.Module | None:
    for arg, flag in (("rms_norm", rms_norm), ("rope", rope), ("attention", attention)):
        check_bool(arg, flag)
    if model is not None:
        family = _family_of(model)
    modeling, norm_name, pretrained_name = _modeling(family)
    pretrained = getattr(modeling, pretrained_name)
    if model is None and attention and not callable(
            getattr(pretrained, "get_correct_attn_implementation", None)):
        raise ImportError("transformers: this version has no get_correct_attn_implementation "
                          "to default new models to eurocore; load them with "
                          "attn_implementation='eurocore' or patch each model instead")
    if attention:
        _register_attention()
    if rope:
        original = _original(modeling, "apply_rotary_pos_emb")
        _patch(modeling, "apply_rotary_pos_emb", _eurocore_rotary(original))
    if model is None:
        if rms_norm:
            _patch(modeling, norm_name, EurocoreRMSNorm)
        if attention:
            cls = pretrained
            original = _original(cls, "get_correct_attn_implementation")
            _patch(cls, "get_correct_attn_implementation", _default_to_eurocore(original))
        return None
    if rms_norm:
        hf_norm = _original(modeling, norm_name)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is hf_norm:
                    setattr(parent, name, _eurocore_norm(child))
    if attention:
        if _ATTN_ORIGINAL not in vars(model):
            vars(model)[_ATTN_ORIGINAL] = model.config._attn_implementation
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return model


def _modeling(family: str) -> tuple[ModuleType, str, str]:
    """The family's modeling module, the name of its RMSNorm and of its PreTrainedModel."""
    try:
        masking_utils = importlib.import_module("transformers.masking_utils")
    except ImportError as err:
        raise ImportError(f"eurocore.integrations.transformers needs transformers >= 4.53 "
                          f"(5.x tested): {err}") from None
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise ImportError("eurocore.integrations.transformers needs transformers >= 4.53 "
                          "(5.x tested): transformers.masking_utils has no "
                          "AttentionMaskInterface")
    module_name, norm_name, pretrained_name = _FAMILIES[family]
    return importlib.import_module(module_name), norm_name, pretrained_name


def _family_of(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"model: expected a transformers Llama or Mistral model (config."
                         f"model_type {' or '.join(map(repr, _FAMILIES))}), got "
                         f"{type(model).__name__} with model_type {model_type!r}")
    return model_type


def _original(owner: Any, name: str) -> Any:
    """The attribute as transformers defines it, whether or not it is patched now."""
    saved = _ORIGINALS.get((id(owner), name))
    return saved[3] if saved is not None else getattr(owner, name)


def _patch(owner: Any, name: str, value: Any) -> None:
    """Sets owner.name, keeping the original once (a second patch keeps the first)."""
    key = (id(owner), name)
    if key in _ORIGINALS:
        return
    _ORIGINALS[key] = (owner, name, name in vars(owner), getattr(owner, name))
    setattr(owner, name, value)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, eurocore_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if callable(getattr(model, "set_attn_implementation", None)):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _default_to_eurocore(original: Callable[..., str]) -> Callable[..., str]:
    """Wraps ``PreTrainedModel.get_correct_attn_implementation``: no request means
    "eurocore" (the model remembers that it took transformers' default)."""

    def get_correct_attn_implementation(self, requested_attention: str | None = None,
                                        is_init_check: bool = False) -> str:
        if requested_attention is None:
            vars(self).setdefault(_ATTN_ORIGINAL, _HF_DEFAULT)
            requested_attention = ATTN_IMPLEMENTATION
        return original(self, requested_attention, is_init_check)

    get_correct_attn_implementation.__wrapped__ = original  # type: ignore[attr-defined]
    return get_correct_attn_implementation


def _revert_attention(model: nn.Module) -> None:
    if _ATTN_ORIGINAL not in vars(model):
        return
    original = vars(model).pop(_ATTN_ORIGINAL)
    for submodule in model.modules():
        vars(submodule).pop(_ATTN_ORIGINAL, None)
    if original in (None, _HF_DEFAULT):
        original = model.get_correct_attn_implementation(None)
    _set_attn_implementation(model, original)


def _eurocore_norm(hf_norm: nn.Module) -> EurocoreRMSNorm:
    """An eurocore norm holding hf_norm's weight Parameter itself and its eps."""
    weight = hf_norm.weight
    norm = EurocoreRMSNorm(weight.shape[0], eps=hf_norm.variance_epsilon, device="meta",
                           dtype=weight.dtype)
    norm.weight = weight
    norm.train(hf_norm.training)
    vars(norm)[_NORM_ORIGINAL] = hf_norm  # kept outside the module tree and state dict
    return norm


def _revert_norms(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    module_name, norm_name, _ = _FAMILIES.get(model_type, _FAMILIES["llama"])
    hf_class = getattr(importlib.import_module(module_name), norm_name)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, EurocoreRMSNorm):
                continue
            hf_norm = vars(child).get(_NORM_ORIGINAL)
            if hf_norm is None:  # built while the class was patched
                with torch.device("meta"):
                    hf_norm = hf_class(child.weight.shape[0], eps=child.eps)
            hf_norm.weight = child.weight
            hf_norm.variance_epsilon = child.eps
            hf_norm.train(child.training)
            setattr(parent, name, hf_norm)


# -------------------------------------------------------------------------------------------
# Rotary
# -------------------------------------------------------------------------------------------


def _eurocore_rotary(original: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
    """HF's ``apply_rotary_pos_emb`` signature over :func:`eurocore.ops.apply_rotary`."""

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k by HF's cos/sin with eurocore's fused rotary (rotate-half).

        Args:
            q: (batch, heads, seq, head_dim) with ``unsqueeze_dim=1``, (batch, seq, heads,
                head_dim) with 2; float16, bfloat16 or float32.
            k: like q with kv_heads heads.
            cos, sin: (batch or 1, seq, head_dim) from HF's rotary embedding module, each
                row the half-width table duplicated.
            unsqueeze_dim: HF's head-axis convention, 1 or 2.

        Returns:
            ``(q_rotated, k_rotated)`` shaped and typed like q and k.
        """
        if not _rotary_fits(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim)
        if unsqueeze_dim == 1:  # eurocore's bshd: (batch, seq, heads, head_dim)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        half = cos.shape[-1] // 2
        if cos.shape[0] == 1:  # the same positions in every row: a (seq, half) table
            out_q, out_k = apply_rotary(q, k, cos[0, :, :half], sin[0, :, :half])
        else:  # a row per token: the tokens flattened ("thd"), token t reads row t
            batch, seq = q.shape[:2]
            table_cos = cos[..., :half].reshape(batch * seq, half)
            table_sin = sin[..., :half].reshape(batch * seq, half)
            out_q, out_k = apply_rotary(q.reshape(batch * seq, *q.shape[2:]),
                                        k.reshape(batch * seq, *k.shape[2:]),
                                        table_cos, table_sin, layout="thd")
            out_q = out_q.view(batch, seq, *q.shape[2:])
            out_k = out_k.view(batch, seq, *k.shape[2:])
        if unsqueeze_dim == 1:
            out_q, out_k = out_q.transpose(1, 2), out_k.transpose(1, 2)
        return out_q, out_k

    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _rotary_fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Whether the call has the form HF's Llama/Mistral attention gives (else HF's runs)."""
    if unsqueeze_dim not in (1, 2) or not all(
            isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False
    batch_axis, seq_axis = 0, 3 - unsqueeze_dim  # seq is axis 2 in (b, h, s, d), 1 in (b, s, h, d)
    head_dim = q.shape[-1]
    return (cos.shape[-1] == head_dim and head_dim % 2 == 0 and k.shape[-1] == head_dim
            and cos.shape[1] == q.shape[seq_axis] == k.shape[seq_axis]
            and cos.shape[0] in (1, q.shape[batch_axis]) and k.shape[0] == q.shape[0])


# -------------------------------------------------------------------------------------------
# Attention paths
# -------------------------------------------------------------------------------------------


def _window_size(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """HF's sliding_window w (the query and w - 1 keys before it) as (left, right)."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or (
            sliding_window < 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


class _PlanCache:
    """One plan per tensor: reused while the same tensor object, unmodified, comes back
    (every layer of one forward gets the same mask), recomputed otherwise."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._plan: Any = None

    def get(self, tensor: torch.Tensor, extra: tuple, compute: Callable[[], Any]) -> Any:
        if torch.compiler.is_compiling() or tensor.is_inference():
            return compute()  # inference tensors have no version counter
        key = (tensor._version, *extra)
        if self._ref is not None and self._ref() is tensor and self._key == key:
            return self._plan
        plan = compute()
        self._ref, self._key, self._plan = weakref.ref(tensor), key, plan
        return plan


_MASKS = _PlanCache()
_POSITIONS = _PlanCache()


def _unpad_plan(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """mask (batch, seq) bool -> (indices of its True entries in the flattened mask,
    int32 cu_seqlens (batch + 1,), the longest row)."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = mask.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   options: dict[str, Any]) -> torch.Tensor:
    """q (batch, seq_q, heads, d), k and v (batch, seq_k, kv_heads, d), mask (batch, seq_k):
    the real tokens packed, attended with the varlen op, scattered back (zeros elsewhere)."""
    batch, seq_q = q.shape[:2]
    if mask.shape[0] != batch:
        raise ValueError(f"attention_mask: batch {mask.shape[0]} differs from the query's "
                         f"{batch}")
    mask = mask if mask.dtype == torch.bool else mask.bool()
    seq_k = mask.shape[1]
    if k.shape[1] > seq_k:  # a static cache: the slots past the mask hold nothing yet
        k, v = k[:, :seq_k], v[:, :seq_k]
    if k.shape[1] < seq_k or seq_q > seq_k:
        raise ValueError(f"attention_mask: covers {seq_k} keys, but the keys are "
                         f"{k.shape[1]} and the queries {seq_q}")

    def plan():
        keys = _unpad_plan(mask)
        # With a cache the queries are the last tokens of each row (left padding).
        return keys, keys if seq_q == seq_k else _unpad_plan(mask[:, seq_k - seq_q:])

    (idx_k, cu_k, max_k), (idx_q, cu_q, max_q) = _MASKS.get(mask, (seq_q,), plan)

    def gather(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, indices)

    out = flash_attention_varlen(gather(q, idx_q), gather(k, idx_k), gather(v, idx_k), cu_q,
                                 cu_k, max_q, max_k, **options)
    full = out.new_zeros(batch * seq_q, *out.shape[1:]).index_copy(0, idx_q, out)
    return full.view(batch, seq_q, *out.shape[1:])


def _packed_plan(position_ids: torch.Tensor, batch: int,
                 seq: int) -> tuple[torch.Tensor, int] | None:
    """Documents packed along rows, where position_ids do not step by 1 (HF's rule): int32
    cu_seqlens over the flattened (batch * seq) tokens and the longest; None when each row
    is one sequence."""
    if position_ids.dim() != 2 or position_ids.shape[1] != seq or (
            position_ids.shape[0] not in (1, batch)):
        return None
    positions = position_ids.expand(batch, seq)
    starts = torch.ones(batch, seq, dtype=torch.bool, device=positions.device)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    begins = starts.reshape(-1).nonzero().squeeze(1)
    if begins.numel() == batch:
        return None
    cu_seqlens = torch.cat((begins, begins.new_full((1,), batch * seq))).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _attend_flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                 cu_k: torch.Tensor, max_q: int, max_k: int,
                 options: dict[str, Any]) -> torch.Tensor:
    """Rows flattened into one packed sequence of documents bounded by cu_q / cu_k."""
    batch, seq_q = q.shape[:2]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    out = flash_attention_varlen(flat(q), flat(k), flat(v), cu_q, cu_k, max_q, max_k,
                                 **options)
    return out.view(batch, seq_q, *out.shape[1:])
