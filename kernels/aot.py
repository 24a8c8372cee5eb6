"""The ahead-of-time compile check's cases: every kernel configuration the launchers emit in
production, compiled for sm_90, sm_80, gfx90a and gfx942 with no GPU.

Each kernel family contributes one generator of cases; :data:`GENERATORS` and :func:`cases`
are the registry. A case is op-level: a launcher's arguments as :class:`TensorSpec` s of
given shapes, dtypes, strides and alignments, and its flags, run through the kernel module's
own launch plans (``eurocore.kernels.launch``), forward and backward; the compile engine's
``aot_case`` turns each plan's Launch into the compilation Triton's JIT would make of it. So
no launcher's argument list is written here, and nothing here can drift from the launchers.

The engine (compilation, targets, the compiler-output parsers) is
``eurocore.kernels.compile_engine``; ``python -m eurocore.benchmarks compile`` runs them all.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from .compile_engine import AotCase, aot_case, dedupe, distinct_launch_configs
from .launch import DTYPES, TensorSpec
from .limits import ROTARY_MAX_HEAD_DIM

# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

# The largest hidden size the launch-configuration sweep goes to (loops over blocks beyond).
RMS_NORM_SWEEP_N = 131072
# The backward's grid is planned for an H100's multiprocessors.
H100_SMS = 132


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
    programs = m.programs_on(rows, H100_SMS)
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

# Rows of the cos/sin tables (a Llama-3 context); the table's size never specialises.
ROTARY_TABLE_ROWS = 8192
# Head dims of real models. Full rotary: 128 (Llama, EuroLLM, Mistral), 64 (Falcon-7B), 96
# (Phi-3-mini), 256 (Gemma-7B), and 80 (Phi-2's head dim). Partial, (head_dim, rotary_dim):
# ChatGLM2 (128, 64), Pythia's rotary_pct 0.25 (128, 32), Phi-2 (80, 32), GPT-J (256, 64).
ROTARY_HEAD_DIMS = (128, 64, 80, 96, 256)  # 128 first: its label survives dedupe
ROTARY_PARTIAL = ((128, 64), (128, 32), (80, 32), (256, 64))
# The largest rotary half the op hands the kernel.
ROTARY_MAX_HALF = ROTARY_MAX_HEAD_DIM // 2


def _rotary(head_dim: int = 128, rotary_dim: int | None = None, dtype: str = "bf16", *,
            table: str = "fp32", layout: str = "bshd", batch: int = 1, seq: int = 4096,
            heads: tuple[int, int] = (32, 8), positions: str | None = None,
            interleaved: bool = False, in_place: bool = False, q_offset: int = 0,
            forward: bool = True, backward: bool = True, note: str = "") -> list[AotCase]:
    """With ``forward``, the rotation of contiguous q and k (``heads`` = (q heads, k heads);
    k heads 0: no k), from the launcher's plan; with ``backward``, the same rotation by the
    negated angle (``conjugate``) of fresh, aligned gradients of q and k, out of place.

    ``layout`` names the token order: the launcher sees (outer, inner) = (batch, seq) for
    "bshd", (seq, batch) for "sbhd" and (1, batch·seq) for the packed "thd". cos/sin:
    (ROTARY_TABLE_ROWS, rotary_dim / 2) of dtype ``table``. ``positions``: None (each token
    at its index), "rows" (int64 (batch, seq), a row per sequence) or "shared" (one row
    expanded over the batch: stride 0), transposed in sbhd; thd's are (1, tokens). q is
    viewed ``q_offset`` elements into its allocation; ``in_place`` writes into q and k.
    """
    from eurocore.kernels import rotary as m

    rotary_dim = rotary_dim or head_dim
    outer, inner = {"bshd": (batch, seq), "sbhd": (seq, batch), "thd": (1, batch * seq)}[layout]

    def tensor(n_heads: int, offset: int = 0) -> TensorSpec | None:
        return TensorSpec((outer, inner, n_heads, head_dim), dtype, offset=offset) \
            if n_heads else None

    pos = None
    if positions:
        rows = (batch, seq) if layout != "thd" else (1, batch * seq)
        pos = TensorSpec(rows, "i64", (rows[1] if positions == "rows" else 0, 1))
        if layout == "sbhd":  # (seq, batch): the transpose
            pos = TensorSpec(rows[::-1], "i64", pos.stride()[::-1])
    cos = TensorSpec((ROTARY_TABLE_ROWS, rotary_dim // 2), table)
    q, k = tensor(heads[0], q_offset), tensor(heads[1])
    rotation = dict(batch_first=layout != "sbhd", interleaved=interleaved)
    launches = []
    if forward:
        launches.append(m.rotary_plan(q, k, *((q, k) if in_place else map(tensor, heads)),
                                      cos, cos, pos, conjugate=False, in_place=in_place,
                                      **rotation))
    if backward:
        launches.append(m.rotary_plan(*map(tensor, heads), *map(tensor, heads), cos, cos, pos,
                                      conjugate=True, in_place=False, **rotation))
    parts = [f"hd={head_dim}" + (f"/rot={rotary_dim}" if rotary_dim != head_dim else ""),
             dtype, layout, f"t={batch * seq}" if layout == "thd" else f"b={batch} s={seq}",
             "h={}/{}".format(*heads), *(name for name, on in (
                 (f"positions:{positions}", positions), ("interleaved", interleaved),
                 ("in place", in_place), ("q misaligned", q_offset),
                 (f"cos:{table}", table != "fp32"), (note, note)) if on)]
    label = " ".join(parts)
    return [aot_case(launch, label + " bwd" * launch.constexprs["CONJUGATE"])
            for launch in launches]


def _rotary_cases() -> list[AotCase]:
    from eurocore.kernels import rotary as m

    out: list[AotCase] = []
    # 1. Launch configurations: the head dims of real models, full and partial rotary; a
    #    partial one out of place copies the tail (COPY_TAIL, BLOCK_TAIL > 1), in place not.
    for head_dim in ROTARY_HEAD_DIMS:
        out += _rotary(head_dim)
    for head_dim, rotary_dim in ROTARY_PARTIAL:
        out += _rotary(head_dim, rotary_dim)
        out += _rotary(head_dim, rotary_dim, in_place=True, backward=False)
        for n_heads in (32, 8):  # one tensor at a time: an in-place rotation's backward
            out += _rotary(head_dim, rotary_dim, heads=(n_heads, 0), forward=False)
    #    Then every block size the op can ask for (forwards only: a backward differs by
    #    CONJUGATE, one negation): each BLOCK_HALF (with its BLOCK_T) at full rotary, and
    #    each BLOCK_TAIL under the largest BLOCK_T (rotary_dim 2, a tail up to 1022 dims).
    sweep = dict(heads=(8, 2), backward=False, note="block sweep")
    for sizes in distinct_launch_configs(lambda h: m.launch_config(h, 0),
                                         ROTARY_MAX_HALF).values():
        out += _rotary(2 * max(sizes), **sweep)
    for sizes in distinct_launch_configs(lambda t: m.launch_config(1, t),
                                         2 * ROTARY_MAX_HALF - 2).values():
        out += _rotary(2 + max(sizes), 2, **sweep)
    # 2. dtype x style x head dim, positions 0 .. seq - 1, fp32 tables, out of place.
    for dtype, interleaved, head_dim in itertools.product(("bf16", "fp16", "fp32"),
                                                          (False, True), ROTARY_HEAD_DIMS):
        out += _rotary(head_dim, dtype=dtype, interleaved=interleaved)
    # 3. One flag or specialisation at a time from the Llama rotation (bf16, head_dim 128,
    #    32/8 heads, bshd, one sequence of 4096), each with its backward.
    for config in (
        dict(in_place=True),  # the forward is out of place's binary
        dict(batch=2),
        # the forms of positions the op hands the launcher (normalised: int64): a row per
        # sequence (position ids or offsets per sequence), or one row shared by the batch
        # (position ids (1, seq), a scalar offset: the KV cache)
        dict(batch=2, positions="rows"),
        dict(batch=2, positions="shared"),
        dict(positions="shared"),
        # sbhd (Megatron): micro-batch 1 makes n_inner the constexpr 1; positions transposed
        dict(layout="sbhd"),
        dict(layout="sbhd", batch=2),
        dict(layout="sbhd", batch=2, positions="rows"),
        dict(layout="sbhd", batch=2, positions="shared"),
        # packed sequences: positions from cu_seqlens, or none; 2^20 tokens make thd's outer
        # stride (tokens x heads x dim) pass 2^31
        dict(layout="thd", seq=16384, positions="rows"),
        dict(layout="thd", seq=16384, positions="rows", interleaved=True),
        dict(layout="thd", seq=16384),
        dict(layout="thd", seq=1 << 20, positions="rows", note="i64 stride"),
        # no k (also the backward of an in-place rotation: one tensor at a time), MQA (one k
        # head: the constexpr 1); decoding one token per sequence at its own offset (n_inner
        # 1, too few programs to group heads)
        dict(heads=(32, 0)),
        dict(heads=(8, 0)),
        dict(heads=(32, 1)),
        dict(batch=8, seq=1, positions="rows", note="decode"),
        dict(batch=8, seq=1, positions="rows", heads=(32, 0), note="decode"),
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
        dict(q_offset=1),
        dict(q_offset=1, in_place=True),
        dict(q_offset=1, heads=(32, 0)),
    ):
        out += _rotary(**config)
    return dedupe(out)


# ---------------------------------------------------------------------------------------------
# Flash attention
# ---------------------------------------------------------------------------------------------


def _attention(vendor: str, head_dim: int = 128, dtype: str = "bf16", *, batch: int = 2,
               seqlen_q: int = 4096, seqlen_k: int | None = None,
               heads: tuple[int, int] = (32, 32), cu_seqlens: tuple[str, int] | None = None,
               window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
               note: str = "") -> list[AotCase]:
    """One attention's launches on ``vendor``'s GPUs, from the launchers' plans: the forward,
    then the backward's δ, dk/dv and dq.

    q, out, do, dq: contiguous (batch, seqlen_q, heads, head_dim); k, v, dk, dv: contiguous
    (batch, seqlen_k, kv heads, head_dim), ``heads`` = (heads, kv heads); lse and δ fp32
    (batch, heads, seqlen_q). ``cu_seqlens`` (index dtype, sequences): packed sequences, batch
    1 and seqlen_q/k the packed totals, lse (heads, total_q). ``window`` as the launchers take
    it (causal is (-1, 0)).
    """
    from eurocore.kernels import flash_attention as m

    seqlen_k = seqlen_k or seqlen_q
    batch = 1 if cu_seqlens else batch
    q, out, do, dq = (TensorSpec((batch, seqlen_q, heads[0], head_dim), dtype) for _ in "1234")
    k, v, dk, dv = (TensorSpec((batch, seqlen_k, heads[1], head_dim), dtype) for _ in "1234")
    lse, delta = (TensorSpec((heads[0], seqlen_q) if cu_seqlens else
                             (batch, heads[0], seqlen_q), "fp32") for _ in "12")
    cu = (TensorSpec((cu_seqlens[1] + 1,), cu_seqlens[0]),) * 2 if cu_seqlens else (None, None)
    options = (head_dim ** -0.5, window, softcap, vendor)  # the scale is the op's default
    launches = [m.attn_fwd_plan(q, k, v, out, lse, *cu, seqlen_q, *options),
                *m.attn_bwd_plan(do, q, k, v, out, lse, delta, dq, dk, dv, *cu, seqlen_q,
                                 seqlen_k, *options)]
    parts = [vendor, f"hd={head_dim}", dtype, "h={}/{}".format(*heads),
             f"t={seqlen_q} cu_seqlens:{cu_seqlens[0]}x{cu_seqlens[1]}" if cu_seqlens
             else f"b={batch} s={seqlen_q}" + (f"/{seqlen_k}" if seqlen_k != seqlen_q else "")]
    parts += [text for text, on in (("causal" if window == (-1, 0) else f"window={window}",
                                     window != (-1, -1)), (f"softcap={softcap:g}", softcap),
                                    (note, note)) if on]
    return [aot_case(launch, " ".join(parts), (vendor,)) for launch in launches]


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
    out: list[AotCase] = []
    for vendor in ATTENTION_VENDORS:  # each compiled for its own vendor's two targets
        # 1. Every launch configuration, forward and backward, without masks or caps, in
        #    bf16, and head_dim 128 in fp16. Llama-3-8B's 32 heads (MHA: group is the
        #    constexpr 1), two sequences of 4096.
        for head_dim in ATTENTION_HEAD_DIMS:
            out += _attention(vendor, head_dim)
        for head_dim in ATTENTION_FP16_HEAD_DIMS:
            out += _attention(vendor, head_dim, "fp16")
        # 2. One flag or specialisation at a time from the bf16 head_dim 128 base, each with
        #    its backward (the δ kernel, which takes none of the flags, deduplicates).
        for config in (
            dict(window=(-1, 0)),  # causal: HAS_WINDOW
            # a causal sliding window (Mistral's 4096 keys, as (4095, 0) or (4096, 0)): 4095
            # compiles to causal's binaries (window_left -1 and 4095 are both i32 not
            # divisible by 16), 4096 to its own
            dict(window=(4095, 0), seqlen_q=8192),
            dict(window=(4096, 0), seqlen_q=8192),
            dict(softcap=50.0),  # SOFTCAP (Gemma-2)
            dict(heads=(32, 8)),  # GQA, group 4 (Llama-3-8B, EuroLLM-9B)
            dict(cu_seqlens=("i32", 8), seqlen_q=16384),  # VARLEN, flash-attn's int32
            # lengths (and so lse strides) not divisible by 16, seqlen_q != seqlen_k (the
            # causal mask aligned to the bottom-right)
            dict(seqlen_q=1000, seqlen_k=4097, window=(-1, 0)),
            dict(head_dim=72),  # head strides and head_dim not divisible by 16
            dict(dtype="fp32", head_dim=64),  # fp32: PRECISION "ieee"
            # 3. the production combinations: Llama-3-8B / EuroLLM-9B training, causal with
            #    GQA, on fixed-length and packed batches
            dict(window=(-1, 0), heads=(32, 8)),
            dict(window=(-1, 0), heads=(32, 8), cu_seqlens=("i32", 8), seqlen_q=16384),
        ):
            out += _attention(vendor, **config)
        # int64 cu_seqlens (the op takes both)
        out += _attention(vendor, cu_seqlens=("i64", 8), seqlen_q=16384)
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
