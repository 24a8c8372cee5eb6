"""RMSNorm modules: drop-in replacements for ``torch.nn.RMSNorm`` and HF ``LlamaRMSNorm``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from eurocore.ops import rms_norm
from eurocore.ops.backends import check_backend_name
from eurocore.utils.checks import check_bool, check_int, check_number


class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` with eurocore's fused kernels: same constructor, same state dict.

    Numerics follow HF ``LlamaRMSNorm`` (see :func:`eurocore.ops.rms_norm`). ``forward(x)``
    returns the normalised x; ``forward(x, residual)`` returns ``(norm(x + residual),
    x + residual)``, the fused pre-norm residual add.

    Args:
        normalized_shape: the trailing shape normalised over (an int or a sequence).
        eps: None uses ``torch.finfo(x.dtype).eps``, as ``torch.nn.RMSNorm`` does.
        elementwise_affine: learn a weight of shape ``normalized_shape``.
        zero_centered_weight: store ``weight`` around 0 and scale by ``1 + weight``.
        backend: fixes the op backend for this module (None: chosen per call).
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        zero_centered_weight: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        if not isinstance(normalized_shape, Sequence) or not normalized_shape:
            raise TypeError(f"normalized_shape: expected an int or a non-empty sequence of "
                            f"ints, got {normalized_shape!r}")
        self.normalized_shape = tuple(check_int("normalized_shape", n, minimum=1)
                                      for n in normalized_shape)
        self.eps = None if eps is None else check_number("eps", eps, minimum=0.0)
        self.elementwise_affine = check_bool("elementwise_affine", elementwise_affine)
        self.zero_centered_weight = check_bool("zero_centered_weight", zero_centered_weight)
        self.backend = check_backend_name(backend)
        if zero_centered_weight and not elementwise_affine:
            raise ValueError("zero_centered_weight: needs elementwise_affine=True")
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Ones (zeros when zero-centred): the identity scale."""
        if self.weight is not None:
            if self.zero_centered_weight:
                nn.init.zeros_(self.weight)
            else:
                nn.init.ones_(self.weight)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (..., *normalized_shape). Returns y like x, or (y, x + residual)."""
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"x: expected trailing shape {self.normalized_shape}, "
                             f"got shape {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        flat = (*x.shape[: x.dim() - k], math.prod(self.normalized_shape))
        out = rms_norm(
            x.reshape(flat), self.weight.reshape(-1) if self.weight is not None else None, eps,
            residual=residual.reshape(flat) if residual is not None else None,
            zero_centered_weight=self.zero_centered_weight, backend=self.backend)
        if residual is None:
            return out.reshape(x.shape)
        return out[0].reshape(x.shape), out[1].reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}"
                + (", zero_centered_weight=True" if self.zero_centered_weight else ""))


class LlamaRMSNorm(RMSNorm):
    """Drop-in for HF transformers' ``LlamaRMSNorm(hidden_size, eps=1e-6)``: same
    constructor, ``variance_epsilon`` attribute and state dict (``weight``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(hidden_size, eps=eps, **kwargs)

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value
