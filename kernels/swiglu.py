"""Fused SwiGLU, forward and backward: the gated activation of the Llama MLP.

Elementwise, in fp32, with σ the logistic sigmoid:

    silu(g) = g · σ(g)
    y       = silu(g) · u                          (rounded once, to the inputs' dtype)

Backward, given dy, from the saved g and u alone (y is not kept):

    dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))      (d silu / dg = σ(g) + g · σ(g) · (1 − σ(g)))
    du = dy · silu(g)

Each tensor is read as rows of n elements with unit stride along the row and any row
stride, so ``gate, up = gate_up.chunk(2, -1)`` of a fused projection is read in place. A
program handles one block of one row: grid (rows, blocks per row), one pass each way.
"""

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, launcher, make_launch

# The largest block of a row one program handles (16 bf16 elements a thread at 8 warps).
MAX_BLOCK_N = 4096
MAX_WARPS = 8


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,
    stride_g, stride_u, stride_y,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride can pass 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> dict:
    """Block size and warp count for rows of ``n_cols`` elements.

    The single source of launch configurations: the launchers use it, and the
    ahead-of-time compile check enumerates its outputs.
    """
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_N)
    num_warps = min(max(block_n // 512, 1), MAX_WARPS)
    return {"BLOCK_N": block_n, "num_warps": num_warps}


# The configuration and grid are pure functions of the shape, cached: derived afresh they cost
# about 3 µs a launch (triton.next_power_of_2 and triton.cdiv are constexpr functions, slow to
# call from the host). The key also holds what may be patched (launch_config, the limits).
@functools.lru_cache(maxsize=1024)
def _config(n_rows: int, n_cols: int, patchables: tuple) -> tuple[tuple[int, int], dict, dict]:
    """(grid, constexprs, launch options) for (n_rows, n_cols)."""
    cfg = launch_config(n_cols)
    return ((n_rows, triton.cdiv(n_cols, cfg["BLOCK_N"])), {"BLOCK_N": cfg["BLOCK_N"]},
            {"num_warps": cfg["num_warps"]})


def _patchables() -> tuple:
    """What the plan reads that a test may patch (part of its key)."""
    return launch_config, MAX_BLOCK_N, MAX_WARPS


def swiglu_fwd_plan(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> Launch:
    """The forward launch into a preallocated y (:func:`swiglu_fwd` runs it): one program per
    block of a row; with no rows or no columns the grid is empty and :meth:`Launch.run`
    launches nothing.

    gate, up, y: (rows, n) with unit stride along n (any row stride), one dtype.
    """
    n_rows, n_cols = gate.shape
    grid, constexprs, options = _config(n_rows, n_cols, _patchables())
    return make_launch((
        _swiglu_fwd_kernel, grid,
        (gate, up, y, gate.stride()[0], up.stride()[0], y.stride()[0], n_cols),
        constexprs, options))


def swiglu_bwd_plan(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    dgate: torch.Tensor, dup: torch.Tensor) -> Launch:
    """The backward launch into preallocated gradients (:func:`swiglu_bwd` runs it).

    dy, gate, up, dgate, dup: (rows, n) with unit stride along n (any row stride).
    """
    n_rows, n_cols = gate.shape
    grid, constexprs, options = _config(n_rows, n_cols, _patchables())
    return make_launch((
        _swiglu_bwd_kernel, grid,
        (dy, gate, up, dgate, dup, dy.stride()[0], gate.stride()[0], up.stride()[0],
         dgate.stride()[0], dup.stride()[0], n_cols),
        constexprs, options))



swiglu_fwd = launcher(swiglu_fwd_plan, "swiglu_fwd")
swiglu_bwd = launcher(swiglu_bwd_plan, "swiglu_bwd")
