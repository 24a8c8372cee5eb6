"""A kernel launch as data, and the tensor stand-in the compile check plans with.

Each kernel module has one pure *plan* function per launch: its launcher's arguments in, a
:class:`Launch` out: the kernel, the grid, the kernel's runtime arguments in parameter order,
its ``tl.constexpr`` values and the launch options (``num_warps``, ``num_stages``,
``waves_per_eu``). Every rule of how a launcher's arguments become kernel arguments (an absent
tensor passed as another with stride 0, the flags, the configuration) lives in the plan and
nowhere else. What is not pure (the device's multiprocessor count, allocations) stays in the
launcher, which passes its results to the plan and runs what comes back::

    rms_norm_fwd_plan(x, weight, residual, eps, zero_centered, y, h, rstd).run()

The ahead-of-time compile check (``eurocore.kernels.aot``) calls the same plans with
:class:`TensorSpec` s in place of tensors, and turns each Launch into the compilation Triton's
JIT would make of it (``compile_engine.aot_case``), so no launcher's argument list is ever
written twice.

A plan runs on every eager call, so its host cost counts (``python -m eurocore.benchmarks
host``): a Launch is a plain NamedTuple, which plans build with :data:`make_launch` (in C:
namedtuple's own ``__new__`` and ``_make`` are Python functions); the derivations that are
slow from the host (``triton.next_power_of_2``, ``triton.cdiv``) stay in the kernel modules'
``lru_cache`` d configurations, whose dicts a Launch shares between calls (read them, never
change them); and plans read a row stride as ``t.stride()[0]``, which costs half of
``t.stride(0)``'s argument parsing.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch


class Launch(NamedTuple):
    """One launch ``kernel[grid](*args, **constexprs, **options)``."""

    kernel: Any  # the @triton.jit function (a JITFunction, or interpreted on the CPU)
    grid: tuple[int, ...]
    args: tuple[Any, ...]  # the runtime arguments, in the kernel's parameter order
    constexprs: dict[str, Any]  # the tl.constexpr parameters, by name
    options: dict[str, Any]  # num_warps, and num_stages / waves_per_eu where given

    def run(self) -> None:
        """Launches the kernel, unless the grid is empty (a dimension of 0 programs): what a
        launcher does with its plan."""
        kernel, grid, args, constexprs, options = self
        if 0 not in grid:
            kernel[grid](*args, **constexprs, **options)


# make_launch((kernel, grid, args, constexprs, options)) is Launch(kernel, grid, args,
# constexprs, options), built by tuple.__new__ without a Python frame: plans run on every call.
make_launch = functools.partial(tuple.__new__, Launch)


def launcher(plan: Callable[..., Launch], name: str) -> Callable[..., None]:
    """The launcher ``name`` of a plan that needs nothing impure (no allocation, no device
    query): it runs the Launch ``plan`` makes of its arguments, which it takes as the plan
    does (``inspect.signature`` shows the plan's), so they are written once.
    """

    def launch(*args: Any, **kwargs: Any) -> None:
        plan(*args, **kwargs).run()

    functools.update_wrapper(launch, plan)
    launch.__signature__ = inspect.signature(plan).replace(return_annotation=None)
    launch.__name__ = launch.__qualname__ = name
    launch.__doc__ = (f"Launches the kernel as :func:`{plan.__name__}` plans it, over the same "
                      f"arguments.")
    return launch

# Short names accepted for a TensorSpec's dtype (the compile check's case lists use them).
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "i32": torch.int32, "i64": torch.int64,
}
# The address a TensorSpec's storage starts at: 16-byte aligned, as every fresh torch
# allocation is; a spec's data_ptr() adds its element offset to it.
_BASE_ADDRESS = 1 << 20


class TensorSpec:
    """Stands in for a tensor in a plan: its dtype, shape, strides and where its data starts.

    Answers what plans and the compile check read of tensors, as a tensor would, and nothing
    else: any other attribute raises ``AttributeError``, so a plan that starts reading more
    fails in the compile check instead of drifting from real tensors (a test compares each
    answer with a real tensor's):

    - ``.shape`` (a ``torch.Size``), ``.stride(i)`` / ``.stride()`` (contiguous unless
      ``strides`` is given) and ``.dtype`` (a ``torch.dtype``): what the plans read;
    - ``.data_ptr()``: what ``compile_engine.aot_case`` reads besides the dtype. The address
      is made up: 16-byte aligned plus ``offset`` elements, so that ``data_ptr() % 16 == 0``
      (what Triton's JIT specialises on) holds as for a view ``offset`` elements into a
      fresh allocation;
    - ``.is_contiguous()``, for its repr.

    ``dtype`` is a ``torch.dtype`` or one of the short names of :data:`DTYPES`.
    """

    __slots__ = ("_strides", "dtype", "offset", "shape")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype | str,
                 strides: Sequence[int] | None = None, offset: int = 0) -> None:
        self.shape = torch.Size(shape)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if strides is None:
            strides = contiguous_strides(self.shape)
        if len(strides) != len(self.shape):
            raise ValueError(f"TensorSpec: {len(strides)} strides for shape {tuple(shape)}")
        self._strides = tuple(strides)
        self.offset = offset

    def stride(self, dim: int | None = None) -> int | tuple[int, ...]:
        return self._strides if dim is None else self._strides[dim]

    def data_ptr(self) -> int:
        return _BASE_ADDRESS + self.offset * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        return all(s == c for s, c, n in zip(self._strides, contiguous_strides(self.shape),
                                             self.shape, strict=True) if n > 1)

    def __repr__(self) -> str:
        extra = "" if self.is_contiguous() else f", strides={self._strides}"
        if self.offset:
            extra += f", offset={self.offset}"
        return f"TensorSpec({tuple(self.shape)}, {self.dtype}{extra})"


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (torch's: a size-0 or 1 dim counts 1)."""
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
