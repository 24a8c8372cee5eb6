"""The ahead-of-time compile check's cases: every kernel configuration the launchers emit in
production, compiled for sm_90, sm_80, gfx90a and gfx942 with no GPU.

Each kernel family contributes one generator of :class:`AotCase` s; :data:`GENERATORS` and
:func:`cases` are the registry. A kernel module with launch plans (``eurocore.kernels.launch``)
is compiled over op-level cases: its launchers' arguments as :class:`TensorSpec` s of given
shapes, dtypes, strides and alignments, and its flags, run through the module's own plans,
forward and backward; :func:`aot_case` turns each plan's Launch into the compilation Triton's
JIT would make of it. So no launcher's argument list is written here, and nothing here can
drift from the launchers. (Rotary and attention still build their cases by hand, checked
against their launchers by tests, until they have plans.)

The compile engine and the compiler-output parsers live in ``eurocore.kernels.compile_engine``;
this module re-exports them (``__all__``) for the generators, the tests and
``python -m eurocore.benchmarks compile``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import triton

from .compile_engine import (
    MAX_SHARED,
    MAX_THREADS_PER_BLOCK,
    NVIDIA_REGISTER_FILE,
    TARGETS,
    VENDORS,
    AotCase,
    AotCompileError,
    AotFailure,
    AotReport,
    LaunchResourceError,
    LaunchSizeError,
    Ptr,
    amdgcn_global_loads,
    amdgcn_metadata,
    aot_case,
    check_launch,
    check_resources,
    compile_all,
    compile_case,
    config_key,
    dedupe,
    distinct_launch_configs,
    has_backend,
    kernel_params,
    parse_ptxas_log,
    ptx_global_loads,
    specialise,
    target_name,
)
from .launch import DTYPES, TensorSpec

__all__ = [
    "GENERATORS", "MAX_SHARED", "MAX_THREADS_PER_BLOCK", "NVIDIA_REGISTER_FILE", "TARGETS",
    "VENDORS", "AotCase", "AotCompileError", "AotFailure", "AotReport", "LaunchResourceError",
    "LaunchSizeError", "Ptr", "TensorSpec", "amdgcn_global_loads", "amdgcn_metadata",
    "aot_case", "cases", "check_launch", "check_resources", "compile_all", "compile_case",
    "config_key", "dedupe", "distinct_launch_configs", "has_backend", "kernel_params",
    "parse_ptxas_log", "ptx_global_loads", "specialise", "target_name",
]

# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

# The largest hidden size the launch-configuration sweep goes to (loops over blocks beyond).
RMS_NORM_SWEEP_N = 131072
# The backward's programs on an H100 (backward_programs: 4 per SM, 132 SMs), at most a row each.
RMS_NORM_PROGRAMS = 528


def _rms_norm(n: int, x: str, r: str | None = None, w: str | None = None, zc: bool = False,
              rows: int = 8192, x_offset: int = 0, note: str = "") -> list[AotCase]:
    """The forward and backward launches of one ``rms_norm`` over ``rows`` rows of ``n``, from
    the launchers' plans over the arguments the op hands them.

    x (dtype ``x``) and the residual (dtype ``r``; None: none) contiguous (rows, n), x viewed
    ``x_offset`` elements into its allocation; the weight (n,) of dtype ``w`` (None: none),
    zero-centred with ``zc``; y and h in h's dtype (x's promoted with the residual's), rstd
    fp32. Backward: dy (and with a residual dh_in) fresh in h's dtype, the saved h (x itself
    without a residual), dx in x's dtype, dr only for a residual of another dtype than x's.
    """
    from eurocore.kernels import rms_norm as m

    shape = (rows, n)
    h_dtype = DTYPES[x] if r is None else torch.promote_types(DTYPES[x], DTYPES[r])
    x_spec = TensorSpec(shape, x, offset=x_offset)
    residual = TensorSpec(shape, r) if r else None
    weight = TensorSpec((n,), w) if w else None
    h = TensorSpec(shape, h_dtype) if r else None
    rstd = TensorSpec((rows,), "fp32")
    forward = m.rms_norm_fwd_plan(x_spec, weight, residual, 1e-6, zc,
                                  TensorSpec(shape, h_dtype), h, rstd)
    programs = min(rows, RMS_NORM_PROGRAMS)
    backward = m.rms_norm_bwd_plan(
        TensorSpec(shape, h_dtype), TensorSpec(shape, h_dtype) if r else None,
        h if r else x_spec, weight, rstd, zc, TensorSpec(shape, x),
        TensorSpec(shape, r) if r and r != x else None, TensorSpec((programs, n), "fp32"),
        programs)
    label = _label(n, x, r, w, zc, note)
    return [aot_case(forward, label), aot_case(backward, label)]


def _rms_norm_cases() -> list[AotCase]:
    from eurocore.kernels import rms_norm as m

    out: list[AotCase] = []
    # 1. Every launch configuration (block, loop flag, warps) the launchers can pick for a
    #    hidden size up to 128K, in bf16 with the Llama pre-norm flags (residual, weight), in
    #    both specialisations real shapes get: n (so the row strides) a multiple of 16, as for
    #    4096, and not, as for 4097. Fresh tensors are 16-byte aligned in both.
    for sizes in distinct_launch_configs(m.launch_config, RMS_NORM_SWEEP_N).values():
        for n in (max((s for s in sizes if s % 16 == 0), default=None),
                  max((s for s in sizes if s % 16 and s > 1), default=None)):
            if n is not None:
                out += _rms_norm(n, "bf16", r="bf16", w="bf16")
    # 2. Every combination of the flags, in each dtype, at one size per code path: 4096 (one
    #    block) for all three dtypes, 32768 (looping over blocks) in bf16.
    weights = [(None, False), ("w", False), ("w", True)]  # zero-centred needs a weight
    for n, dtypes in ((4096, ("fp32", "fp16", "bf16")), (32768, ("bf16",))):
        for dt, residual, (w, zc) in itertools.product(dtypes, (False, True), weights):
            out += _rms_norm(n, dt, r=dt if residual else None, w=w and dt, zc=zc)
    # 3. Mixed dtypes the op allows: fp32 weights with bf16 activations; a residual stream of
    #    another dtype (h, y promoted; dr written separately: HAS_DR); fp16 with bf16 → fp32.
    for x, r, w in (("bf16", None, "fp32"), ("bf16", "fp32", "fp32"), ("fp32", "bf16", "bf16"),
                    ("fp16", "bf16", "fp32")):
        for n in (4096, 32768):
            out += _rms_norm(n, x, r=r, w=w)
    out += _rms_norm(4096, "bf16", r="fp32", w="bf16", zc=True)
    # 4. Specialisations of small or odd launches: a hidden size of 1 (n_cols and the strides
    #    become the constexpr 1), one row per backward program (rows_per_program = 1: up to
    #    4 rows per SM), a single row, and an x viewed at an odd offset (pointer not aligned:
    #    x, and without a residual the h its backward reads).
    out += _rms_norm(1, "bf16", r="bf16", w="bf16")
    out += _rms_norm(4096, "bf16", r="bf16", w="bf16", rows=300, note="300 rows")
    out += _rms_norm(4097, "bf16", w="bf16", rows=1, note="1 row")
    out += _rms_norm(4097, "bf16", w="bf16", x_offset=1, note="x misaligned")
    return dedupe(out)


def _label(n, x, r, w, zc, note) -> str:
    parts = [f"n={n}", f"x:{x}"]
    if r:
        parts.append(f"r:{r}")
    if w:
        parts.append(f"w:{w}" + ("+1" if zc else ""))
    if note:
        parts.append(note)
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------------------------

_ROTARY_LAYOUTS = ("bshd", "sbhd", "thd")


def _rotary_case(*, head_dim: int = 128, rotary_dim: int | None = None, dtype: str = "bf16",
                 table: str = "fp32", layout: str = "bshd", batch: int = 1, seq: int = 4096,
                 q_heads: int = 32, k_heads: int = 8, n_positions: int = 8192,
                 interleaved: bool = False, conjugate: bool = False, inplace: bool = False,
                 position_ids: str | None = None, shared_positions: bool = False,
                 offsets: str | None = None, cu_seqlens: tuple[str, int] | None = None,
                 offset: int = 0, q_aligned: bool = True, note: str = "") -> AotCase:
    """The rotary kernel as ``eurocore.kernels.rotary.rotary`` launches it for one
    ``apply_rotary`` call on contiguous tensors (a test compares it with the real launcher).

    q is (batch, seq, q_heads, head_dim) in ``bshd``, (seq, batch, ...) in ``sbhd`` and
    (batch·seq, q_heads, head_dim) in ``thd``; k likewise with ``k_heads`` heads (0: k is
    None); the outputs are new contiguous tensors, or q and k themselves when ``inplace``.
    cos/sin: contiguous (n_positions, rotary_dim / 2) of dtype ``table``. ``position_ids``
    and ``offsets``: None, or the index dtype ("i64", "i32") of positions (batch, seq) (or
    (1, seq) when ``shared_positions``; (tokens,) in thd) / of one offset per sequence;
    ``cu_seqlens``: None or (index dtype, sequences), thd only. ``offset``: the scalar
    seqlen_offsets. ``q_aligned`` False: q is a view at an odd element offset. The op
    normalises these four into one int64 position per token, or none
    (``eurocore.ops.rotary.normalize_positions``); the kernel sees only that.
    """
    from eurocore.kernels import rotary as m

    if layout not in _ROTARY_LAYOUTS:
        raise ValueError(f"layout: expected one of {_ROTARY_LAYOUTS}, got {layout!r}")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    n_tokens = batch * seq
    # Tokens are (outer, inner) pairs to the launcher: (batch, seq) in bshd, (seq, batch) in
    # sbhd, (1, tokens) in thd (which arrives unsqueezed).
    n_inner = {"bshd": seq, "sbhd": batch, "thd": n_tokens}[layout]

    def strides(heads: int) -> tuple[int, int, int]:  # contiguous (outer, inner, heads, dim)
        return n_inner * heads * head_dim, heads * head_dim, head_dim

    copy_tail = not inplace and head_dim > 2 * half
    cfg = m.launch_config(half, head_dim - 2 * half if copy_tail else 0)
    heads = m.heads_per_program(triton.cdiv(n_tokens, cfg["BLOCK_T"]), q_heads, k_heads)
    # Without k the launcher passes q (and out_q) in k's place, with q's strides.
    q = Ptr(dtype, q_aligned)
    out_q = q if inplace else Ptr(dtype)
    if k_heads:
        k = Ptr(dtype)
        out_k = k if inplace else Ptr(dtype)
    else:
        k, out_k = q, out_q
    q_strides = strides(q_heads)
    k_strides = strides(k_heads) if k_heads else q_strides
    # Normalised positions, (outer, inner) to the kernel: without any, strides that make the
    # token's index along the sequence its position; in thd one row (stride 0 for outer 1);
    # else (batch, seq) int64, a row per sequence for per-sequence ids or offsets, or one
    # shared row expanded (stride 0), transposed in sbhd. A dimension of size 1 gets 0.
    has_positions = bool(position_ids or offsets or cu_seqlens or offset)
    if not has_positions:
        pos_strides = (1, 0) if layout == "sbhd" else (0, 1)
    elif layout == "thd":
        pos_strides = (0, 1 if n_tokens > 1 else 0)
    else:
        per_row = batch > 1 and bool(offsets or (position_ids and not shared_positions))
        by_batch, by_seq = (seq if per_row else 0), (1 if seq > 1 else 0)
        pos_strides = (by_batch, by_seq) if layout == "bshd" else (by_seq, by_batch)
    args: dict[str, Any] = dict(
        Q=q, K=k, OUT_Q=out_q, OUT_K=out_k,
        COS=Ptr(table), SIN=Ptr(table), POSITIONS=Ptr("i64" if has_positions else table),
        n_tokens=n_tokens, n_inner=n_inner,
        n_q_heads=q_heads, n_k_heads=k_heads, q_groups=triton.cdiv(q_heads, heads),
        heads_per_program=heads, head_dim=head_dim, stride_cos=half,
        n_positions=n_positions,
        stride_pos_outer=pos_strides[0], stride_pos_inner=pos_strides[1])
    for prefix, values in (("q", q_strides), ("k", k_strides), ("oq", q_strides),
                           ("ok", k_strides)):
        args.update({f"stride_{prefix}_{axis}": v
                     for axis, v in zip(("outer", "inner", "head"), values, strict=True)})
    flags = dict(HAS_POSITIONS=has_positions, INTERLEAVED=interleaved, CONJUGATE=conjugate,
                 COPY_TAIL=copy_tail, HALF=cfg["HALF"], BLOCK_T=cfg["BLOCK_T"],
                 BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_TAIL=cfg["BLOCK_TAIL"])
    kernel = m._rotary_kernel
    sig, const, div = specialise(kernel_params(kernel), args, flags)
    parts = [f"hd={head_dim}" + (f"/rot={rotary_dim}" if rotary_dim != head_dim else ""),
             dtype, layout, f"t={n_tokens}" if layout == "thd" else f"b={batch} s={seq}",
             f"h={q_heads}/{k_heads}"]
    parts += [name for name, on in (("interleaved", interleaved), ("bwd", conjugate),
                                    ("inplace", inplace), ("q misaligned", not q_aligned))
              if on]
    if table != "fp32":
        parts.append(f"cos:{table}")
    if position_ids:
        parts.append(f"position_ids:{position_ids}" + ("(1,s)" if shared_positions else ""))
    if offsets:
        parts.append(f"offsets:{offsets}")
    if cu_seqlens:
        parts.append(f"cu_seqlens:{cu_seqlens[0]}x{cu_seqlens[1]}")
    if offset:
        parts.append(f"offset={offset}")
    if note:
        parts.append(note)
    return AotCase("_rotary_kernel", kernel, sig, const, cfg["num_warps"], None, div,
                   " ".join(parts))


# Head dims of real models. Full rotary: 128 (Llama, EuroLLM, Mistral), 64 (Falcon-7B), 96
# (Phi-3-mini), 256 (Gemma-7B), and 80 (Phi-2's head dim). Partial, (head_dim, rotary_dim):
# ChatGLM2 (128, 64), Pythia's rotary_pct 0.25 (128, 32), Phi-2 (80, 32), GPT-J (256, 64).
ROTARY_HEAD_DIMS = (128, 64, 80, 96, 256)  # 128 first: its label survives dedupe
ROTARY_PARTIAL = ((128, 64), (128, 32), (80, 32), (256, 64))


def _rotary_with_backward(**config: Any) -> list[AotCase]:
    """The forward launch of ``config`` and the backward launches autograd makes for it:
    out of place, one launch rotating the (fresh, aligned) output gradients of q and k by
    the negated angle (CONJUGATE); in place, one such launch per tensor, without k."""
    out = [_rotary_case(**config)]
    backward = {**config, "conjugate": True, "q_aligned": True}
    if not config.get("inplace"):
        return [*out, _rotary_case(**backward)]
    backward["inplace"] = False
    q_heads, k_heads = config.get("q_heads", 32), config.get("k_heads", 8)
    for heads in (q_heads, k_heads) if k_heads else (q_heads,):
        out.append(_rotary_case(**{**backward, "q_heads": heads, "k_heads": 0}))
    return out


def _rotary_cases() -> list[AotCase]:
    from eurocore.kernels import rotary as m

    case, both = _rotary_case, _rotary_with_backward
    out: list[AotCase] = []
    # 1. Launch configurations: the head dims of real models, full and partial rotary; a
    #    partial one out of place copies the tail (COPY_TAIL, BLOCK_TAIL > 1), in place not.
    for head_dim in ROTARY_HEAD_DIMS:
        out += both(head_dim=head_dim)
    for head_dim, rotary_dim in ROTARY_PARTIAL:
        out += both(head_dim=head_dim, rotary_dim=rotary_dim)
        out += both(head_dim=head_dim, rotary_dim=rotary_dim, inplace=True)
    #    Then every block size the op can ask for, up to its MAX_KERNEL_HEAD_DIM of 1024
    #    (forwards only: a backward differs by CONJUGATE, one negation): each BLOCK_HALF (with
    #    its BLOCK_T) at full rotary, and each BLOCK_TAIL under the largest BLOCK_T (rotary_dim
    #    2 and a tail up to 1022 dims).
    max_half = 512  # MAX_KERNEL_HEAD_DIM // 2 of eurocore.ops.rotary; a test fails past it
    for sizes in distinct_launch_configs(lambda h: m.launch_config(h, 0), max_half).values():
        out.append(case(head_dim=2 * max(sizes), q_heads=8, k_heads=2, note="block sweep"))
    for sizes in distinct_launch_configs(lambda t: m.launch_config(1, t),
                                         2 * max_half - 2).values():
        out.append(case(head_dim=2 + max(sizes), rotary_dim=2, q_heads=8, k_heads=2,
                        note="block sweep"))
    # 2. dtype x style x head dim with the common flags (bshd, positions 0 .. seq - 1, fp32
    #    tables, out of place), forward and backward.
    for dtype, interleaved, head_dim in itertools.product(("bf16", "fp16", "fp32"),
                                                          (False, True), ROTARY_HEAD_DIMS):
        out += both(head_dim=head_dim, dtype=dtype, interleaved=interleaved)
    # 3. One flag or specialisation at a time from the Llama forward (bf16, head_dim 128,
    #    32/8 heads, bshd, one sequence of 4096), each with its backward.
    for config in (
        dict(inplace=True),  # the forward is out of place's binary; the backward is not
        dict(batch=2),
        # positions (normalised by the op to int64 per token: a row per sequence, or one
        # shared row): explicit ids (per sequence, shared, int32), offsets per sequence, a
        # scalar offset (KV cache)
        dict(batch=2, position_ids="i64"),
        dict(batch=2, position_ids="i64", shared_positions=True),
        dict(batch=2, position_ids="i32"),
        dict(batch=2, offsets="i64"),
        dict(batch=2, offsets="i32"),
        dict(offset=17),
        dict(offset=4096),
        # sbhd (Megatron): micro-batch 1 makes n_inner the constexpr 1; positions transposed
        dict(layout="sbhd"),
        dict(layout="sbhd", batch=2),
        dict(layout="sbhd", batch=2, position_ids="i64"),
        dict(layout="sbhd", batch=2, offset=17),
        # packed sequences: cu_seqlens int32 (flash-attn's) and int64, one sequence, offsets
        # per sequence; thd without cu_seqlens, with position ids
        dict(layout="thd", seq=16384, cu_seqlens=("i32", 8)),
        dict(layout="thd", seq=16384, cu_seqlens=("i64", 8)),
        dict(layout="thd", seq=16384, cu_seqlens=("i32", 1)),
        dict(layout="thd", seq=16384, cu_seqlens=("i32", 8), offsets="i32"),
        dict(layout="thd", seq=16384, cu_seqlens=("i32", 8), interleaved=True),
        dict(layout="thd", seq=16384),
        dict(layout="thd", seq=16384, position_ids="i64"),
        # a packed batch of 2^20 tokens: thd's outer stride (tokens x heads x dim) > 2^31
        dict(layout="thd", seq=1 << 20, cu_seqlens=("i32", 256), note="i64 stride"),
        # no k; MQA (one k head: the constexpr 1); decoding one token per sequence with a
        # KV-cache offset each (n_inner 1, too few programs to group heads)
        dict(k_heads=0),
        dict(k_heads=1),
        dict(batch=8, seq=1, offsets="i32", note="decode"),
        dict(batch=8, seq=1, offsets="i32", k_heads=0, note="decode"),
        # tables in the activations' dtype (HF's cos/sin), mixed with fp32 q
        dict(table="bf16"),
        dict(dtype="fp16", table="fp16"),
        dict(dtype="fp32", table="bf16"),
        # a head_dim (and half) not divisible by 16: head strides lose divisibility
        dict(head_dim=100),
        dict(head_dim=100, interleaved=True),
        dict(head_dim=100, rotary_dim=64),
        # q viewed at an odd element offset (pointer not 16-byte aligned), out of place and
        # in place (the output pointer is q's)
        dict(q_aligned=False),
        dict(q_aligned=False, inplace=True),
        dict(q_aligned=False, k_heads=0),
    ):
        out += both(**config)
    return dedupe(out)


# ---------------------------------------------------------------------------------------------
# Flash attention
# ---------------------------------------------------------------------------------------------


def _attention_launch(*, vendor: str, backward: bool, head_dim: int = 128,
                      dtype: str = "bf16", batch: int = 2, seqlen_q: int = 4096,
                      seqlen_k: int | None = None, heads: int = 32, kv_heads: int | None = None,
                      cu_seqlens: tuple[str, int] | None = None, causal: bool = False,
                      window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      note: str = "") -> list[AotCase]:
    """The launches of one ``flash_attention`` call on ``vendor``'s GPUs, as
    ``eurocore.kernels.flash_attention`` makes them: the forward (``flash_attn_fwd``), or
    with ``backward`` the three kernels of ``flash_attn_bwd`` (δ, dk/dv, dq). A test compares
    them with the real launchers' launches.

    q, out, do, dq: contiguous (batch, seqlen_q, heads, head_dim); k, v, dk, dv: contiguous
    (batch, seqlen_k, kv_heads, head_dim) (kv_heads None: heads); lse and δ fp32 (batch,
    heads, seqlen_q). ``cu_seqlens`` (index dtype, sequences): packed sequences
    (``flash_attention_varlen``): ``seqlen_q``/``seqlen_k`` are then the packed token counts,
    batch 1, the lse (heads, total_q). ``causal`` and ``window`` as the op takes them.
    """

    from eurocore.kernels import flash_attention as m

    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    kv_heads = heads if kv_heads is None else kv_heads
    if cu_seqlens:
        batch = 1
    left, right = (window[0], 0) if causal else window  # the op's window for causal
    fp32 = dtype == "fp32"
    cfgs = {kernel: m.launch_config(head_dim, vendor, kernel, fp32) for kernel in m.KERNELS}
    precision = m.INPUT_PRECISION
    scale, cap, flags = m._scale_args(head_dim ** -0.5, softcap, (left, right))
    varlen = cu_seqlens is not None

    def strides(seq: int, n_heads: int) -> tuple[int, int, int]:
        """(batch, seq, head) strides of a contiguous tensor; packed: batch stride 0."""
        return (0 if varlen else seq * n_heads * head_dim), n_heads * head_dim, head_dim

    q_strides, kv_strides = strides(seqlen_q, heads), strides(seqlen_k, kv_heads)
    cu = Ptr(cu_seqlens[0]) if varlen else Ptr(dtype)  # not varlen: q stands in
    tensors = {name: Ptr(dtype) for name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    tensors.update(LSE=Ptr("fp32"), DELTA=Ptr("fp32"), CU_Q=cu, CU_K=cu)
    # lse and δ strides are not arguments (the kernels derive them); dk and dv share "dkv"
    stride_of = {"q": q_strides, "o": q_strides, "do": q_strides, "dq": q_strides,
                 "k": kv_strides, "v": kv_strides, "dkv": kv_strides}
    scalars = dict(fixed_seqlen_q=seqlen_q, fixed_seqlen_k=seqlen_k, group=heads // kv_heads,
                   head_dim=head_dim, qk_scale=scale, sm_scale=head_dim ** -0.5, softcap=cap,
                   window_left=left, window_right=right)

    parts = [vendor, f"hd={head_dim}", dtype, f"h={heads}/{kv_heads}"]
    parts.append(f"t={seqlen_q} cu_seqlens:{cu_seqlens[0]}x{cu_seqlens[1]}" if varlen
                 else f"b={batch} s={seqlen_q}" + (f"/{seqlen_k}" if seqlen_k != seqlen_q
                                                  else ""))
    if causal:
        parts.append("causal")
    if (left, right) != ((-1, 0) if causal else (-1, -1)):
        parts.append(f"window=({left},{right})")
    if softcap:
        parts.append(f"softcap={softcap:g}")
    if note:
        parts.append(note)
    label = " ".join(parts)

    def case(kernel_name: str, n_heads: int, flags: dict[str, Any], cfg: dict[str, Any],
             tiles: tuple[str, ...] = ("BLOCK_M", "BLOCK_N", "BLOCK_D")) -> AotCase:
        """One kernel's launch under ``cfg`` (launch_config's: tiles, warps, stages, options)."""
        kernel_flags = {**flags, **{k: cfg[k] for k in tiles}}
        options = {k: v for k, v in cfg.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_D",
                                                             "num_warps", "num_stages")}
        kernel = getattr(m, kernel_name)
        params = kernel_params(kernel)
        args: dict[str, Any] = {}
        for name in params:
            if name in kernel_flags:
                continue
            if name in tensors:
                args[name] = tensors[name]
            elif name.startswith("stride_"):
                prefix, axis = name[len("stride_"):-1], "bsh".index(name[-1])
                args[name] = stride_of[prefix][axis]
            elif name in ("n_heads", "n_kv_heads"):
                args[name] = n_heads
            else:
                args[name] = scalars[name]
        sig, const, div = specialise(params, args, kernel_flags)
        return AotCase(kernel_name, kernel, sig, const, cfg["num_warps"], cfg["num_stages"],
                       div, label, options, (vendor,))

    common = dict(VARLEN=varlen, **flags, PRECISION=precision)
    if not backward:
        return [case("_attn_fwd_kernel", heads, common, cfgs["forward"])]
    return [case("_attn_bwd_delta_kernel", heads, dict(VARLEN=varlen), cfgs["dq"],
                 ("BLOCK_M", "BLOCK_D")),
            case("_attn_bwd_dkdv_kernel", kv_heads, common, cfgs["dkdv"]),
            case("_attn_bwd_dq_kernel", heads, common, cfgs["dq"])]


def _attention_both(**config: Any) -> list[AotCase]:
    """The forward and the backward launches of ``config`` (see :func:`_attention_launch`)."""
    return [*_attention_launch(**config, backward=False),
            *_attention_launch(**config, backward=True)]


# Head dims of real models: 128 (Llama, EuroLLM, Mistral), 64 (GPT-2, Falcon-7B), 96
# (Phi-3-mini), 256 (Gemma), 80 (Phi-2; not a power of two: BLOCK_D 128, masked) and 32 (small
# models), then 16, the smallest BLOCK_D (head dims 8 and 16): with 32 and 64 they give every
# launch configuration the op can ask for (a test sweeps every head_dim). 96 and 80 compile to
# 128's binaries (every stride still divisible by 16) and are deduplicated; 128 first: its
# labels survive dedupe. fp16 at 128 only: its binaries differ from bf16's in the element type
# alone (the same tiles, shared memory and registers on every target), and CI time counts.
ATTENTION_HEAD_DIMS = (128, 64, 96, 256, 80, 32, 16)
ATTENTION_FP16_HEAD_DIMS = (128,)
ATTENTION_VENDORS = ("nvidia", "amd")


def _attention_cases() -> list[AotCase]:
    both = _attention_both
    out: list[AotCase] = []
    for vendor in ATTENTION_VENDORS:  # each compiled for its own vendor's two targets
        # 1. Every launch configuration, forward and backward, without masks or caps, in
        #    bf16, and head_dim 128 in fp16. Llama-3-8B's 32 heads (MHA: group is the
        #    constexpr 1), two sequences of 4096.
        for head_dim in ATTENTION_HEAD_DIMS:
            out += both(vendor=vendor, head_dim=head_dim, dtype="bf16")
        for head_dim in ATTENTION_FP16_HEAD_DIMS:
            out += both(vendor=vendor, head_dim=head_dim, dtype="fp16")
        # 2. One flag or specialisation at a time from the bf16 head_dim 128 base, each with
        #    its backward (the δ kernel, which takes none of the flags, deduplicates).
        for config in (
            dict(causal=True),  # HAS_WINDOW with window (-1, 0)
            # a causal sliding window (Mistral): the same binaries as causal (window_left -1
            # and 4095 are both i32 not divisible by 16), kept to say so
            dict(causal=True, window=(4095, 0), seqlen_q=8192),
            dict(softcap=50.0),  # SOFTCAP (Gemma-2)
            dict(kv_heads=8),  # GQA, group 4 (Llama-3-8B, EuroLLM-9B)
            dict(cu_seqlens=("i32", 8), seqlen_q=16384),  # VARLEN, flash-attn's int32
            # lengths (and so lse strides) not divisible by 16, seqlen_q != seqlen_k (the
            # causal mask aligned to the bottom-right)
            dict(seqlen_q=1000, seqlen_k=4097, causal=True),
            dict(head_dim=72),  # head strides and head_dim not divisible by 16
            dict(dtype="fp32", head_dim=64),  # fp32: PRECISION "ieee"
            # 3. the production combinations: Llama-3-8B / EuroLLM-9B training, causal with
            #    GQA, on fixed-length and packed batches
            dict(causal=True, kv_heads=8),
            dict(causal=True, kv_heads=8, cu_seqlens=("i32", 8), seqlen_q=16384),
        ):
            out += both(vendor=vendor, **config)
        # int64 cu_seqlens (the op takes both): the forward only (its backward would differ
        # from the int32 one in that pointer's type alone)
        out += _attention_launch(vendor=vendor, backward=False, cu_seqlens=("i64", 8),
                                 seqlen_q=16384)
    return dedupe(out)

# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------

# Intermediate sizes of real models: Llama-3-8B 14336, EuroLLM-9B 12288, Llama-2-7B 11008,
# Llama-3-70B 28672; 14336 first: its labels survive dedupe.
SWIGLU_SIZES = (14336, 12288, 11008, 28672)
# The largest row the launch-configuration sweep goes to: past MAX_BLOCK_N rows only add
# programs, never a configuration.
SWIGLU_SWEEP_N = 65536


def _swiglu(n: int, dtype: str = "bf16", *, fused: bool = False, gate_offset: int = 0,
            dy_expanded: bool = False, rows: int = 4096, note: str = "") -> list[AotCase]:
    """The forward and backward launches of one ``swiglu`` on ``rows`` rows of ``n``, from
    the launchers' plans over the arguments the op hands them.

    gate and up: contiguous (rows, n), or with ``fused`` the two halves of a contiguous
    (rows, 2n) gate/up projection (row stride 2n; up starts n elements after gate); gate
    viewed ``gate_offset`` elements into its allocation. y, dgate and dup fresh and
    contiguous; dy autograd's, contiguous, or one row expanded (stride 0) with ``dy_expanded``.
    """
    from eurocore.kernels import swiglu as m

    shape = (rows, n)
    strides = (2 * n, 1) if fused else None
    gate = TensorSpec(shape, dtype, strides, offset=gate_offset)
    up = TensorSpec(shape, dtype, strides, offset=gate_offset + n if fused else 0)
    dy = TensorSpec(shape, dtype, (0, 1) if dy_expanded else None)
    forward = m.swiglu_fwd_plan(gate, up, TensorSpec(shape, dtype))
    backward = m.swiglu_bwd_plan(dy, gate, up, TensorSpec(shape, dtype),
                                 TensorSpec(shape, dtype))
    parts = [f"n={n}", dtype]
    parts += [name for name, on in (("fused gate/up", fused), ("gate misaligned", gate_offset),
                                    ("dy expanded", dy_expanded), (note, note)) if on]
    label = " ".join(parts)
    return [aot_case(forward, label), aot_case(backward, label)]


def _swiglu_cases() -> list[AotCase]:
    from eurocore.kernels import swiglu as m

    out: list[AotCase] = []
    # 1. Every launch configuration (block, warps), in bf16 on contiguous rows, with n (so
    #    the row strides) a multiple of 16 and not; n = 1 makes n_cols and the strides the
    #    constexpr 1.
    for sizes in distinct_launch_configs(m.launch_config, SWIGLU_SWEEP_N).values():
        for n in (max((s for s in sizes if s % 16 == 0), default=None),
                  max((s for s in sizes if s % 16), default=None)):
            if n is not None:
                out += _swiglu(n)
    # 2. The real models' sizes in every dtype, contiguous and as the halves of a fused
    #    gate/up projection.
    for n, dtype, fused in itertools.product(SWIGLU_SIZES, ("bf16", "fp16", "fp32"),
                                             (False, True)):
        out += _swiglu(n, dtype, fused=fused)
    # 3. Specialisations of odd launches: fused halves of an odd size (up misaligned, row
    #    strides not multiples of 16), a misaligned gate, an expanded output gradient.
    out += _swiglu(4097, fused=True)
    out += _swiglu(4097, "fp32", fused=True)
    out += _swiglu(14336, gate_offset=1)
    out += _swiglu(4097, gate_offset=1)
    out += _swiglu(4097, dy_expanded=True)
    out += _swiglu(14336, dy_expanded=True)
    return dedupe(out)


# kernel family → case generator; a new kernel module adds one line here.
GENERATORS: dict[str, Callable[[], list[AotCase]]] = {
    "rms_norm": _rms_norm_cases,
    "rotary": _rotary_cases,
    "attention": _attention_cases,
    "swiglu": _swiglu_cases,
}


def cases(kernel: str | None = None) -> list[AotCase]:
    """Every configuration to compile ahead of time, or those of one kernel family."""
    if kernel is not None and kernel not in GENERATORS:
        raise KeyError(f"no AOT cases for {kernel!r}; known: {', '.join(GENERATORS)}")
    names = [kernel] if kernel else list(GENERATORS)
    return [case for name in names for case in GENERATORS[name]()]
