"""Hypothesis strategies for the fuzzer: tensors in random memory layouts, index tensors,
packed-sequence boundaries. Values come from a seeded generator, so an example is a pure
function of what Hypothesis drew (and shrinks like one)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from tests.conftest import DEVICE

# Half types everywhere; the interpreter computes bf16 tl.dot wrongly (docs/design.md), so
# tests of dot-based kernels on the CPU take FLOAT_DTYPES_NO_BF16.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES_NO_BF16 = (torch.float32, torch.float16)
# How a tensor sits in memory: the ops promise the same answer for each.
LAYOUTS = ("contiguous", "padded", "permuted", "strided", "expanded")


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def randn(seed: int, shape: Sequence[int], dtype: torch.dtype, scale: float = 1.0
          ) -> torch.Tensor:
    """A contiguous random normal tensor from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


def laid_out(values: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """``values`` (contiguous) copied into a tensor of the same shape and the given memory
    layout: ``padded`` rows longer than the tensor, ``permuted`` dims stored in another
    order, ``strided`` every other element of a wider last dim (non-unit stride along the
    last dim), ``expanded`` a stride-0 dim (the values along the first dim longer than 1 are
    made equal first). The junk around the values is NaN (-7 for integers), so a kernel
    reading outside the tensor shows."""
    shape = tuple(values.shape)
    junk = math.nan if values.is_floating_point() else -7
    if layout == "contiguous" or values.dim() == 0:
        return values.clone()
    if layout == "padded":
        base = torch.full((*shape[:-1], shape[-1] + 3), junk, dtype=values.dtype,
                          device=values.device)
        view = base[..., : shape[-1]]
    elif layout == "permuted":
        order = torch.randperm(values.dim(), generator=torch.Generator().manual_seed(seed))
        base = torch.full([shape[d] for d in order.tolist()], junk, dtype=values.dtype,
                          device=values.device)
        view = base.permute(*torch.argsort(order).tolist())
    elif layout == "strided":
        base = torch.full((*shape[:-1], 2 * shape[-1]), junk, dtype=values.dtype,
                          device=values.device)
        view = base[..., ::2]
    elif layout == "expanded":
        dim = next((d for d, n in enumerate(shape) if n > 1), None)
        if dim is None:
            return values.clone()
        one = values.narrow(dim, 0, 1).clone()
        return one.expand(shape)
    else:
        raise AssertionError(layout)
    view.copy_(values)
    return view


@st.composite
def tensors(draw, shape: Sequence[int], dtype: torch.dtype, *, scale: float = 1.0,
            layouts: Sequence[str] = LAYOUTS) -> torch.Tensor:
    """A random tensor of ``shape`` in one of ``layouts``."""
    seed = draw(seeds())
    return laid_out(randn(seed, shape, dtype, scale), draw(st.sampled_from(layouts)), seed)


@st.composite
def index_tensors(draw, values: Sequence[int]) -> torch.Tensor:
    """``values`` as an int32 or int64 tensor, contiguous or not (a column of a 2-D tensor,
    every other element of a longer one): the ops must read values, whatever the layout."""
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    flat = torch.tensor(list(values), dtype=dtype, device=DEVICE)
    layout = draw(st.sampled_from(["contiguous", "column", "every_other"]))
    if layout == "column":
        return torch.stack([flat, torch.full_like(flat, -7)], dim=1)[:, 0]
    if layout == "every_other":
        return torch.stack([flat, torch.full_like(flat, -7)], dim=1).flatten()[::2]
    return flat


@st.composite
def sequence_lengths(draw, max_sequences: int = 4, max_length: int = 9) -> list[int]:
    """Lengths of packed sequences, empty ones included."""
    return draw(st.lists(st.integers(0, max_length), min_size=1, max_size=max_sequences))


def bounds(lengths: Sequence[int]) -> list[int]:
    """cu_seqlens values: 0, then the running total of ``lengths``."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out
