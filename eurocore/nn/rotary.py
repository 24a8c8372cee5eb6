"""Rotary embedding module: a drop-in for HF transformers' ``LlamaRotaryEmbedding`` plus
``apply_rotary_pos_emb``, over :func:`eurocore.ops.apply_rotary`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from eurocore.ops.backends import check_backend_name
from eurocore.ops.rotary import LAYOUTS, apply_rotary, rope_cos_sin
from eurocore.utils.checks import check_bool, check_int, check_number

_REQUIRED = object()  # from_hf_config: a field without a default


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings for q and k (GQA head counts may differ) in one call.

    Holds the float32 tables ``cos`` and ``sin``, each (max_position_embeddings,
    rotary_dim // 2), from :func:`eurocore.ops.rope_cos_sin` (computed in float64, rounded
    once). They are non-persistent buffers, so the module adds no state-dict keys, as HF's
    (whose only buffer, ``inv_freq``, is non-persistent too). They stay float32 and exact
    through ``.to(dtype)``, ``.half()``, device moves and meta-device construction followed
    by ``to_empty``: any change of their dtype or device rebuilds them. They take
    ``8 * max_position_embeddings * rotary_dim / 2`` bytes (64 MiB for Llama 3.1's 131072
    positions and head_dim 128): share one module across layers, as HF shares its
    ``rotary_emb``, and consider DDP's ``broadcast_buffers=False``, which would otherwise
    send them from rank 0 at every forward.

    Mapping from HF transformers (Llama and the models that copy its rotary code): HF's
    ``LlamaRotaryEmbedding(config)(x, position_ids)`` returns ``cos, sin`` of shape
    (batch, seq, head_dim): the half-width table duplicated, ``cat((c, c), -1)``, taken at
    ``position_ids``, in x's dtype; ``apply_rotary_pos_emb(q, k, cos, sin)`` then takes q, k
    as (batch, heads, seq, head_dim). The eurocore equivalent::

        rope = RotaryEmbedding.from_hf_config(config)
        q, k = rope(q.transpose(1, 2), k.transpose(1, 2), position_ids=position_ids)
        q, k = q.transpose(1, 2), k.transpose(1, 2)

    or keep (batch, seq, heads, head_dim) ("bshd") throughout, as eurocore models do.
    Differences: eurocore's table is float32 computed in float64, HF's is computed in float32
    and rounded to x's dtype, so the results agree to within HF's rounding (which at position
    65536 reaches ~4e-3 radians); the rotation itself is computed in float32 and rounded once.
    HF's ``attention_scaling`` is 1 for the rope types supported here (default, linear,
    llama3). With ``partial_rotary_factor`` < 1 only the first ``rotary_dim`` dims of each
    head rotate (rotate-half within them), as in HF's GPT-NeoX and Phi.

    Args:
        rotary_dim: dims rotated per head, even; the rest pass through.
        max_position_embeddings: table length; positions must lie in
            ``[0, max_position_embeddings)``.
        theta: the RoPE base (``rope_theta``).
        scaling: HF's ``rope_parameters`` / ``rope_scaling`` dict (see
            :func:`eurocore.ops.rope_cos_sin`); a ``rope_theta`` in it overrides ``theta``.
        interleaved: GPT-J pairs (2i, 2i + 1) instead of rotate-half pairs (i, i + r/2).
        layout: "bshd", "sbhd" or "thd", the layout ``forward`` expects.
        backend: fixes the op backend for this module (None: chosen per call).
        device: where the tables are made.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        rotary_dim: int,
        max_position_embeddings: int = 4096,
        *,
        theta: float = 10000.0,
        scaling: Mapping[str, Any] | None = None,
        interleaved: bool = False,
        layout: str = "bshd",
        backend: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("max_position_embeddings", max_position_embeddings, minimum=1)
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        check_bool("interleaved", interleaved)
        check_backend_name(backend)
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.theta = theta
        self.scaling = dict(scaling) if isinstance(scaling, Mapping) else scaling
        self.interleaved = interleaved
        self.layout = layout
        self.backend = backend
        cos, sin = self._tables(device)  # also validates rotary_dim, theta and scaling
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.max_position_embeddings, self.rotary_dim, theta=self.theta,
                            scaling=self.scaling, device=device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        device = self.cos.device
        super()._apply(fn, recurse)
        # A cast would round the tables and to_empty() leaves garbage: rebuild exact fp32
        # ones after any change of dtype or device (share_memory() and the like keep theirs).
        if self.cos.dtype != torch.float32 or self.cos.device != device:
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        seqlen_offsets: int | torch.Tensor = 0,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotates q and k with this module's tables, layout, pairing and backend.

        Args:
            q: float16, bfloat16 or float32 (float64 on the torch backend), in the module's
                layout: ``bshd`` (batch, seq, heads, head_dim), ``sbhd`` (seq, batch, heads,
                head_dim) or ``thd`` (total_tokens, heads, head_dim); head_dim >= rotary_dim.
                HF's (batch, heads, seq, head_dim) is ``q.transpose(1, 2)`` in ``bshd``.
            k: like q with its own head count, or None.
            position_ids: integer (batch or 1, seq), in ``thd`` (total_tokens,); each below
                ``max_position_embeddings``. Default: ``s + seqlen_offsets``.
            cu_seqlens: ``thd`` only: int32/int64 (sequences + 1,) packed-sequence bounds;
                positions restart at 0 in each sequence.
            seqlen_offsets: an int, or an integer tensor with one offset per sequence.
            inplace: write the result into q and k (autograd stays correct).

        Returns:
            ``(q_rotated, k_rotated)`` shaped and typed like q and k; ``k_rotated`` is None
            when k is None. See :func:`eurocore.ops.apply_rotary`.
        """
        return apply_rotary(
            q, k, self.cos, self.sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
            seqlen_offsets=seqlen_offsets, interleaved=self.interleaved, layout=self.layout,
            inplace=inplace, backend=self.backend)

    @classmethod
    def from_hf_config(cls, config: Any, **kwargs: Any) -> RotaryEmbedding:
        """Builds the module an HF transformers config describes, without importing
        transformers: any object with the config's attributes serves.

        ``head_dim`` is ``config.head_dim``, else ``hidden_size // num_attention_heads``;
        ``rotary_dim = int(head_dim * partial_rotary_factor)`` (default 1.0). theta, the rope
        type and its fields come from ``config.rope_parameters`` (transformers v5, which also
        holds ``rope_theta`` and ``partial_rotary_factor``), else from ``config.rope_theta``,
        ``config.rope_scaling`` and ``config.partial_rotary_factor`` (v4). Note that HF's
        Llama ignores ``partial_rotary_factor`` for the default rope type and rotates the
        whole head; models that support partial rotary (GPT-NeoX, Phi) honour it, as here.

        Args:
            config: e.g. a ``LlamaConfig``, or a ``types.SimpleNamespace`` with its fields.
            kwargs: passed to the constructor (``layout``, ``interleaved``, ``backend``,
                ``device``); ``max_position_embeddings`` here overrides the config's.
        """
        def field(name: str, default: Any = _REQUIRED) -> Any:
            value = getattr(config, name, default)
            if value is _REQUIRED:
                raise ValueError(f"config: has no {name!r}, which a rotary embedding needs "
                                 f"(an HF Llama-style config: hidden_size, "
                                 f"num_attention_heads, max_position_embeddings, rope_theta)")
            return value

        head_dim = field("head_dim", None)
        if head_dim is None:
            heads = check_int("config.num_attention_heads", field("num_attention_heads"),
                              minimum=1)
            head_dim = check_int("config.hidden_size", field("hidden_size"), minimum=1) // heads
        theta = field("rope_theta", None)
        partial = field("partial_rotary_factor", None)
        rope_parameters = field("rope_parameters", None)
        if rope_parameters:
            if not isinstance(rope_parameters, Mapping):
                raise TypeError(f"config.rope_parameters: expected a dict, got "
                                f"{type(rope_parameters).__name__}")
            scaling = dict(rope_parameters)
            theta = scaling.get("rope_theta", theta)
            partial = scaling.get("partial_rotary_factor", partial)
        else:
            scaling = field("rope_scaling", None)
        if partial is not None:
            check_number("config.partial_rotary_factor", partial, minimum=0.0, maximum=1.0,
                         inclusive=False)
        kwargs.setdefault("max_position_embeddings", field("max_position_embeddings"))
        return cls(int(head_dim * (1.0 if partial is None else partial)),
                   theta=10000.0 if theta is None else theta, scaling=scaling, **kwargs)

    def extra_repr(self) -> str:
        parts = [f"rotary_dim={self.rotary_dim}",
                 f"max_position_embeddings={self.max_position_embeddings}",
                 f"theta={self.theta}"]
        if self.scaling is not None:
            parts.append(f"scaling={self.scaling}")
        if self.interleaved:
            parts.append("interleaved=True")
        if self.layout != "bshd":
            parts.append(f"layout={self.layout!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
