"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int,
                  minimum: float = 0.0) -> float:
    """The rate at optimizer step ``step`` (0-based): linear warmup from peak / warmup_steps
    to peak over ``warmup_steps`` steps, then a cosine from peak down to ``minimum`` at
    ``total_steps``, and ``minimum`` after."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= total_steps:
        return minimum
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters: matrices decay, vectors (norm weights) do not.

    On a GPU the fused implementation (one kernel for all parameters), else foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)
