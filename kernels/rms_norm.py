"""Fused RMSNorm, optionally after a residual add, forward and backward.

Per row of n elements, in fp32:

    h    = x + r                  (h = x without a residual; rounded to h's dtype)
    rstd = 1 / sqrt(mean(h²) + eps)
    n̂    = round(h · rstd)       (to h's dtype, as HF LlamaRMSNorm does)
    y    = n̂ · w                 (w → 1 + w zero-centred; no weight: y = n̂)

Backward, with g = dy · w, x̂ = h · rstd and dh_in the gradient reaching h from the
residual stream (the second output):

    dh = rstd · (g − x̂ · mean(g · x̂)) + dh_in,    dx = dr = dh
    dw = Σ_rows dy · n̂

One program normalises one row. When a row is longer than the largest block the program
loops over it in blocks (two passes: sum of squares, then normalise). The weight gradient is
deterministic: each backward program sums its own rows into a private fp32 row of
`dw_partial`, and those rows are summed in a fixed order afterwards; no atomics.
"""

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, launcher, make_launch

# The largest row held in registers at once; longer rows loop over blocks of this size.
MAX_BLOCK_N = 16384
# At most 16 warps: 1024 threads with AMD's 64-wide wavefronts, the hardware limit there.
MAX_WARPS = 16


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride can pass 2**31
    X += row * stride_x
    Y += row * stride_y
    if HAS_RESIDUAL:
        R += row * stride_r
        H += row * stride_h
    cols = tl.arange(0, BLOCK_N)

    if ONE_BLOCK:
        mask = cols < n_cols
        h = _load_h(X, R, H, cols, mask, HAS_RESIDUAL)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        _store_y(Y, W, h, rstd, cols, mask, HAS_WEIGHT, ZERO_CENTERED)
    else:
        sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            h = _load_h(X, R, H, start + cols, mask, HAS_RESIDUAL)
            sum_sq += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            if HAS_RESIDUAL:  # h was rounded and written by the first pass
                h = tl.load(H + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            _store_y(Y, W, h, rstd, start + cols, mask, HAS_WEIGHT, ZERO_CENTERED)
    tl.store(RSTD + row, rstd)


@triton.jit
def _load_h(X, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """Loads one block of h in fp32; with a residual, rounds x + r to h's dtype and stores it."""
    h = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty)
        tl.store(H + cols, h, mask=mask)
        h = h.to(tl.float32)
    return h


@triton.jit
def _store_y(Y, W, h, rstd, cols, mask, HAS_WEIGHT: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    y = (h * rstd).to(Y.dtype.element_ty)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w += 1.0
        y = (y.to(tl.float32) * w).to(Y.dtype.element_ty)
    tl.store(Y + cols, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH_IN, H, W, RSTD, DX, DR, DW_PARTIAL,
    stride_dy, stride_dh_in, stride_h, stride_dx, stride_dr,
    n_rows, n_cols, rows_per_program,
    HAS_DH_IN: tl.constexpr, HAS_DR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ZERO_CENTERED: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    DW_PARTIAL += pid * n_cols

    if ONE_BLOCK:
        mask = cols < n_cols
        w = _load_w(W, cols, mask, HAS_WEIGHT, ZERO_CENTERED)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat = h * rstd
            g = dy * w
            c = tl.sum(g * x_hat, axis=0) / n_cols
            dh = rstd * (g - x_hat * c)
            _store_dh(DH_IN, DX, DR, dh, row, stride_dh_in, stride_dx, stride_dr, cols, mask,
                      HAS_DH_IN, HAS_DR)
            if HAS_WEIGHT:
                dw += dy * x_hat.to(H.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
    else:
        # The row does not fit one block: a pass for mean(g · x̂), then one for dh. This
        # program's dw partial row (zeroed by the launcher) accumulates in memory it alone owns.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                w = _load_w(W, start + cols, mask, HAS_WEIGHT, ZERO_CENTERED)
                dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0)
                h = tl.load(H + row * stride_h + start + cols, mask=mask, other=0.0)
                acc += dy.to(tl.float32) * w * h.to(tl.float32)
            c = tl.sum(acc, axis=0) * rstd / n_cols
            for start in range(0, n_cols, BLOCK_N):
                mask = start + cols < n_cols
                w = _load_w(W, start + cols, mask, HAS_WEIGHT, ZERO_CENTERED)
                dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0)
                h = tl.load(H + row * stride_h + start + cols, mask=mask, other=0.0)
                dy = dy.to(tl.float32)
                x_hat = h.to(tl.float32) * rstd
                dh = rstd * (dy * w - x_hat * c)
                _store_dh(DH_IN, DX, DR, dh, row, stride_dh_in, stride_dx, stride_dr,
                          start + cols, mask, HAS_DH_IN, HAS_DR)
                if HAS_WEIGHT:
                    dw_ptrs = DW_PARTIAL + start + cols
                    dw = tl.load(dw_ptrs, mask=mask, other=0.0)
                    dw += dy * x_hat.to(H.dtype.element_ty).to(tl.float32)
                    tl.store(dw_ptrs, dw, mask=mask)


@triton.jit
def _load_w(W, cols, mask, HAS_WEIGHT: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w += 1.0
    else:
        w = 1.0
    return w


@triton.jit
def _store_dh(DH_IN, DX, DR, dh, row, stride_dh_in, stride_dx, stride_dr, cols, mask,
              HAS_DH_IN: tl.constexpr, HAS_DR: tl.constexpr):
    if HAS_DH_IN:
        dh += tl.load(DH_IN + row * stride_dh_in + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
    if HAS_DR:
        tl.store(DR + row * stride_dr + cols, dh.to(DR.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> dict:
    """Block size, loop flag and warp count for rows of ``n_cols`` elements.

    The single source of launch configurations: the launchers use it, and the
    ahead-of-time compile check enumerates its outputs.
    """
    block_n = min(max(triton.next_power_of_2(n_cols), 256), MAX_BLOCK_N)
    num_warps = min(max(block_n // 512, 1), MAX_WARPS)
    return {"BLOCK_N": block_n, "ONE_BLOCK": n_cols <= block_n, "num_warps": num_warps}


# Backward programs per multiprocessor (benchmarks/tune.py sweeps it).
PROGRAMS_PER_SM = 4


def backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs in the backward grid, and rows of ``dw_partial``: a pure function of the
    row count and the device model, so the weight gradient's summation order is too."""
    if device.type != "cuda":  # the CPU interpreter: a few programs still make partial sums
        return programs_on(n_rows, 1)
    return programs_on(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)


def programs_on(n_rows: int, multiprocessors: int) -> int:
    """:func:`backward_programs` on a device of ``multiprocessors`` SMs (CUs): at most
    PROGRAMS_PER_SM per multiprocessor and one per row."""
    return max(1, min(n_rows, PROGRAMS_PER_SM * multiprocessors))


# A plan derives its configuration from shapes and flags alone. Derived afresh, that is about
# 2 µs a call (triton.next_power_of_2 is a constexpr function, slow to call from the host) next
# to a kernel that may run for less; so it is cached per shape and flags. The key also holds
# everything the derivation reads that can be patched (the functions and the module limits:
# benchmarks/tune.py, the tests), so a patched one never meets a stale entry.


@functools.lru_cache(maxsize=1024)
def _forward_static(n_cols: int, has_residual: bool, has_weight: bool, zero_centered: bool,
                    patchables: tuple) -> tuple[dict, dict]:
    """(constexprs, launch options) of a forward over rows of ``n_cols``."""
    cfg = launch_config(n_cols)
    return ({"HAS_RESIDUAL": has_residual, "HAS_WEIGHT": has_weight,
             "ZERO_CENTERED": zero_centered, "BLOCK_N": cfg["BLOCK_N"],
             "ONE_BLOCK": cfg["ONE_BLOCK"]}, {"num_warps": cfg["num_warps"]})


@functools.lru_cache(maxsize=1024)
def _backward_static(n_cols: int, has_dh_in: bool, has_dr: bool, has_weight: bool,
                     zero_centered: bool, patchables: tuple) -> tuple[dict, dict]:
    """(constexprs, launch options) of a backward over rows of ``n_cols``."""
    cfg = launch_config(n_cols)
    return ({"HAS_DH_IN": has_dh_in, "HAS_DR": has_dr, "HAS_WEIGHT": has_weight,
             "ZERO_CENTERED": zero_centered, "BLOCK_N": cfg["BLOCK_N"],
             "ONE_BLOCK": cfg["ONE_BLOCK"]}, {"num_warps": cfg["num_warps"]})


@functools.lru_cache(maxsize=1024)
def _backward_setup(n_rows: int, n_cols: int, device: torch.device,
                    patchables: tuple) -> tuple[int, bool]:
    """(programs, whether dw_partial must start zeroed) of a backward over (n_rows, n_cols)."""
    return backward_programs(n_rows, device), not launch_config(n_cols)["ONE_BLOCK"]


def _patchables() -> tuple:
    """What the plans read that a tuning sweep or a test may patch (part of their key)."""
    return launch_config, backward_programs, MAX_BLOCK_N, MAX_WARPS


def rms_norm_fwd_plan(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    zero_centered_weight: bool,
    y: torch.Tensor,
    h: torch.Tensor | None,
    rstd: torch.Tensor,
) -> Launch:
    """The forward launch into preallocated outputs (:func:`rms_norm_fwd` runs it): one
    program per row (none for no rows: :meth:`Launch.run` then launches nothing).

    x, residual: (rows, n) with unit stride along n (any row stride); weight: (n,) contiguous.
    y: (rows, n) in h's dtype; h: (rows, n), written only with a residual; rstd: (rows,) fp32.

    An absent residual is passed as x with stride 0 (and h as y), an absent weight as x: the
    kernel reads neither, its HAS_* flags say so.
    """
    n_rows, n_cols = x.shape
    if residual is None:
        r, stride_r, h, stride_h = x, 0, y, 0
    else:
        r, stride_r, stride_h = residual, residual.stride()[0], h.stride()[0]
    constexprs, options = _forward_static(n_cols, residual is not None, weight is not None,
                                          zero_centered_weight, _patchables())
    return make_launch((
        _rms_norm_fwd_kernel, (n_rows,),
        (x, r, x if weight is None else weight, y, h, rstd,
         x.stride()[0], stride_r, y.stride()[0], stride_h, n_cols, eps),
        constexprs, options))


def rms_norm_bwd_plan(
    dy: torch.Tensor,
    dh_in: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    zero_centered_weight: bool,
    dx: torch.Tensor,
    dr: torch.Tensor | None,
    dw_partial: torch.Tensor,
    programs: int,
) -> Launch:
    """The backward launch over :func:`rms_norm_bwd`'s arguments, on ``programs`` programs
    (none for no rows), each summing its weight gradient into its own fp32 row of
    ``dw_partial`` ((programs, n); zeroed where rows loop over blocks).

    An absent dh_in is passed as dy with stride 0, dr as dx with stride 0, the weight as h.
    """
    n_rows, n_cols = h.shape
    constexprs, options = _backward_static(n_cols, dh_in is not None, dr is not None,
                                           weight is not None, zero_centered_weight,
                                           _patchables())
    if dh_in is None:
        dh_in, stride_dh_in = dy, 0
    else:
        stride_dh_in = dh_in.stride()[0]
    if dr is None:
        dr, stride_dr = dx, 0
    else:
        stride_dr = dr.stride()[0]
    return make_launch((
        _rms_norm_bwd_kernel, (programs if n_rows else 0,),
        (dy, dh_in, h, h if weight is None else weight, rstd, dx, dr, dw_partial,
         dy.stride()[0], stride_dh_in, h.stride()[0], dx.stride()[0], stride_dr,
         n_rows, n_cols, -(-n_rows // programs)),  # rows per program
        constexprs, options))


rms_norm_fwd = launcher(rms_norm_fwd_plan, "rms_norm_fwd")


def rms_norm_bwd(
    dy: torch.Tensor,
    dh_in: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    zero_centered_weight: bool,
    dx: torch.Tensor,
    dr: torch.Tensor | None,
) -> torch.Tensor | None:
    """Launches the backward kernel; returns the weight gradient in fp32 (None without weight).

    dy, dh_in, h: (rows, n) with unit stride along n; rstd: (rows,) fp32 from the forward.
    dx and dr (the residual's gradient, when its dtype differs from dx's) are written.
    """
    n_rows, n_cols = h.shape
    device = h.device
    programs, zeroed = _backward_setup(n_rows, n_cols, device, _patchables())
    has_weight = weight is not None
    # Single-block programs store their whole partial row; looping ones accumulate into it.
    dw_partial = (torch.zeros if zeroed else torch.empty)(
        (programs, n_cols) if has_weight else (1,), dtype=torch.float32, device=device)
    rms_norm_bwd_plan(dy, dh_in, h, weight, rstd, zero_centered_weight, dx, dr, dw_partial,
                      programs).run()
    if not has_weight:
        return None
    if n_rows == 0:
        return torch.zeros(n_cols, dtype=torch.float32, device=device)
    return dw_partial.sum(dim=0)  # a fixed-order reduction over a fixed number of rows
