"""Ahead-of-time compilation of every kernel configuration for named GPU targets, no GPU needed.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))`` runs
the whole compiler (TTIR → TTGIR → LLVM → PTX/cubin or AMDGCN/hsaco) for a target that is
not present, so CI on a CPU machine catches what the first real GPU would otherwise meet: a
compile error, a launch too large for the hardware, spills, loads left unvectorised.

Each kernel module contributes one generator of :class:`AotCase` s, the configurations its
launchers can emit in production, specialised as Triton's JIT would specialise a real
launch (see :func:`specialise`); :func:`cases` is the registry. :func:`compile_case`
compiles one case for one target and returns an :class:`AotReport`; :func:`compile_all`
compiles many, in worker processes when asked to or when it has to (below).

Kernels defined under the interpreter. ``TRITON_INTERPRET=1`` (set by tests/conftest.py on
CPU machines before any eurocore import) makes ``@triton.jit`` return an
``InterpretedFunction``, which ``ASTSource`` cannot compile: its helpers (``_load_h`` ...)
are interpreted functions too, not ``JITFunction`` s the code generator can call, and the
interpreter patches ``triton.language`` while it runs kernels (Triton 3.9 restores the
patches afterwards; older releases are not guaranteed to). So whenever a case's kernel is
not a ``JITFunction``, compilation goes to fresh worker processes started with
``TRITON_INTERPRET`` removed from their environment: there the kernel module is imported
anew (cases pickle their kernel by module and name, not by value) and defines real
``JITFunction`` s, and no interpreted kernel has ever run. This needs no cooperation from the
kernel modules and works the same on every Triton version.

Imports only the standard library and Triton; a case's kernel module (and so torch) is
imported when the case is built or compiled.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import itertools
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# The targets CI compiles for: Hopper, Ampere, MI250X (CDNA2) and MI300X (CDNA3).
TARGETS: dict[str, GPUTarget] = {
    "sm_90": GPUTarget("cuda", 90, 32),
    "sm_80": GPUTarget("cuda", 80, 32),
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}

# Triton backend name -> the vendor name kernel launchers use for their configuration tables.
VENDORS: dict[str, str] = {"cuda": "nvidia", "hip": "amd"}

# Threads per block (CUDA) or workgroup (HIP): the hardware limit on both vendors.
MAX_THREADS_PER_BLOCK = 1024
# Shared memory (LDS) one program may use: the opt-in maximum per block on H100 (227 KiB) and
# A100 (163 KiB), the 64 KiB LDS of CDNA2/CDNA3. Triton checks this only when it loads the
# binary on a GPU; here a compiled case over it fails.
MAX_SHARED: dict[str, int] = {"sm_90": 232448, "sm_80": 166912, "gfx90a": 65536,
                              "gfx942": 65536}
# 32-bit registers in an NVIDIA SM's register file, allocated per warp in units of 256.
NVIDIA_REGISTER_FILE = 65536


class LaunchResourceError(ValueError):
    """A case would not launch on the target: too many threads, or (once compiled) more
    shared memory or registers per program than the hardware has."""


class LaunchSizeError(LaunchResourceError):
    """A configuration launches more threads per program than the target allows."""


class AotCompileError(RuntimeError):
    """Triton failed to compile a case for a target."""


@dataclass
class AotCase:
    """One compilation: a kernel, its specialised signature, and launch options.

    ``signature`` maps every parameter of the kernel, in order, to a Triton type ("*bf16",
    "i32", "fp32") or "constexpr"; ``constexprs`` gives the value of each "constexpr" one
    (the ``tl.constexpr`` flags, and integers the JIT specialises to 1). ``divisible`` names
    the arguments known to be multiples of 16 (pointers: 16-byte aligned), as the JIT marks
    them. ``num_stages`` None leaves the backend's default, as a launch without it gets.
    ``options`` are further launch options passed to the compiler as the launch passes them
    (e.g. AMD's ``waves_per_eu``). ``vendors`` names the GPU vendors ("nvidia", "amd") whose
    launchers emit this configuration, when the launch configuration depends on the vendor:
    the case is compiled only for their targets (see :meth:`applies_to`); empty means every
    target.
    """

    kernel: str
    fn: Any  # the kernel object as its module defines it (a JITFunction unless interpreted)
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int | None = None
    divisible: tuple[str, ...] = ()
    label: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    vendors: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kernel}[{self.label}, num_warps={self.num_warps}]"

    def applies_to(self, target: GPUTarget) -> bool:
        """Whether this configuration is launched on ``target``'s vendor (always, when the
        case names no vendor)."""
        return not self.vendors or VENDORS.get(target.backend) in self.vendors

    def __reduce__(self):
        # Pickled by reference: the worker imports the kernel module itself, so it gets a
        # JITFunction even when this process defined the kernel under the interpreter.
        raw = getattr(self.fn, "fn", self.fn)  # InterpretedFunction.fn is the Python function
        return (_rebuild_case, (raw.__module__, raw.__qualname__, self.kernel, self.signature,
                                self.constexprs, self.num_warps, self.num_stages,
                                self.divisible, self.label, self.options, self.vendors))


def _rebuild_case(module, qualname, *fields) -> AotCase:
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    kernel, *rest = fields
    return AotCase(kernel, fn, *rest)


@dataclass
class AotReport:
    """What one compilation produced; register fields are None where the target lacks them."""

    kernel: str
    label: str
    target: str
    num_warps: int
    shared: int  # bytes of shared memory (LDS on AMD) per program
    widest_load: int  # bytes moved by the widest global load instruction
    loads: tuple[str, ...] = ()  # the distinct global load instructions, e.g. "ld.global.v4.b32"
    regs: int | None = None  # NVIDIA, from ptxas -v (None where no log was produced)
    spill_bytes: int | None = None  # NVIDIA: spill stores + spill loads
    vgpr: int | None = None  # AMD, from the AMDGCN metadata
    sgpr: int | None = None
    agpr: int | None = None
    vgpr_spill: int | None = None
    sgpr_spill: int | None = None

    @property
    def spills(self) -> int:
        """Spilled bytes (NVIDIA) or registers (AMD); 0 when unknown."""
        return (self.spill_bytes or 0) + (self.vgpr_spill or 0) + (self.sgpr_spill or 0)


@dataclass
class AotFailure:
    """A case that did not compile for a target, with the reason."""

    kernel: str
    label: str
    target: str
    num_warps: int
    error: str

    def __str__(self) -> str:
        return f"{self.kernel}[{self.label}, num_warps={self.num_warps}] on {self.target}: " \
               f"{self.error}"


# ---------------------------------------------------------------------------------------------
# Specialisation: the signature Triton's JIT derives from a launch's actual arguments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: its element type ("bf16", "fp16", "fp32") and whether its data
    pointer is 16-byte aligned (fresh torch allocations are; odd-offset views may not be)."""

    dtype: str
    aligned: bool = True


def specialise(fn_params: Sequence[str], args: dict[str, Any], flags: dict[str, Any]
               ) -> tuple[dict[str, str], dict[str, Any], tuple[str, ...]]:
    """(signature, constexprs, divisible) for a launch with these argument values.

    Mirrors the JIT's specialisation of a launch: an int equal to 1 becomes the constexpr 1;
    other ints are "i32" (or "i64" outside int32) and divisible when a multiple of 16 (0
    included); floats are "fp32"; a pointer is divisible when 16-byte aligned. ``flags`` are
    the ``tl.constexpr`` parameters. Every parameter must be given exactly once.
    """
    missing = set(fn_params) - set(args) - set(flags)
    extra = (set(args) | set(flags)) - set(fn_params)
    if missing or extra:
        raise ValueError(f"specialise: missing {sorted(missing)}, unknown {sorted(extra)}")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    divisible: list[str] = []
    for name in fn_params:
        if name in flags:
            signature[name], constexprs[name] = "constexpr", flags[name]
            continue
        value = args[name]
        if isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            if value.aligned:
                divisible.append(name)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"specialise: {name}={value!r}: expected a Ptr, an int or a float")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
    return signature, constexprs, tuple(divisible)


def kernel_params(fn: Any) -> list[str]:
    """The parameter names of a @triton.jit kernel, interpreted or not."""
    names = getattr(fn, "arg_names", None)
    return list(names) if names else list(inspect.signature(getattr(fn, "fn", fn)).parameters)


def promote(a: str, b: str) -> str:
    """torch.promote_types for the kernels' float types: fp16 with bf16 gives fp32."""
    return a if a == b else "fp32"


def dedupe(items: Iterable[AotCase]) -> list[AotCase]:
    """Drops cases that compile to the same binary as an earlier one (first label kept)."""
    seen: set[tuple] = set()
    out = []
    for case in items:
        key = (case.kernel, tuple(case.signature.items()), tuple(sorted(case.constexprs.items())),
               case.num_warps, case.num_stages, case.divisible,
               tuple(sorted(case.options.items())), case.vendors)
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


# ---------------------------------------------------------------------------------------------
# The registry: one generator per kernel module
# ---------------------------------------------------------------------------------------------


def distinct_launch_configs(launch_config: Callable[[int], dict], max_n: int
                            ) -> dict[tuple, list[int]]:
    """Each distinct ``launch_config(n)`` for n in 1..max_n, with the sizes tried that give it.

    Launch configurations change only where ``triton.next_power_of_2`` does, so powers of two
    and their neighbours find every one; the test sweeps every n to prove it.
    """
    sizes = {1, max_n}
    k = 1
    while k <= max_n:
        sizes.update(n for n in (k - 1, k, k + 1) if 1 <= n <= max_n)
        k *= 2
    configs: dict[tuple, list[int]] = {}
    for n in sorted(sizes):
        configs.setdefault(config_key(launch_config(n)), []).append(n)
    return configs


def config_key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def _rms_norm_cases() -> list[AotCase]:
    from eurocore.kernels import rms_norm as m

    fwd, bwd = m._rms_norm_fwd_kernel, m._rms_norm_bwd_kernel
    fwd_params, bwd_params = kernel_params(fwd), kernel_params(bwd)
    eps = 1e-6

    def fwd_case(n, x, r=None, w=None, zc=False, x_aligned=True, note=""):
        """The forward as rms_norm_fwd launches it: contiguous rows of n, h/y in h's dtype;
        an absent residual/weight/h is passed as x/x/y with stride 0."""
        cfg = m.launch_config(n)
        h = x if r is None else promote(x, r)
        args = dict(
            X=Ptr(x, x_aligned), R=Ptr(r or x, x_aligned if r is None else True),
            W=Ptr(w or x, x_aligned if w is None else True), Y=Ptr(h), H=Ptr(h), RSTD=Ptr("fp32"),
            stride_x=n, stride_r=n if r else 0, stride_y=n, stride_h=n if r else 0,
            n_cols=n, eps=eps)
        flags = dict(HAS_RESIDUAL=r is not None, HAS_WEIGHT=w is not None, ZERO_CENTERED=zc,
                     BLOCK_N=cfg["BLOCK_N"], ONE_BLOCK=cfg["ONE_BLOCK"])
        sig, const, div = specialise(fwd_params, args, flags)
        label = _label(n, x, r, w, zc, note)
        return AotCase("_rms_norm_fwd_kernel", fwd, sig, const, cfg["num_warps"], None, div,
                       label)

    def bwd_case(n, x, r=None, w=None, zc=False, n_rows=8192, programs=528, note=""):
        """The backward as the op calls rms_norm_bwd: dy/dh_in/h in h's dtype (h is x without
        a residual), dx in x's dtype, dr only for a residual of another dtype than x; absent
        tensors are passed as dy/h/dx with stride 0. programs: 4 per SM (528 on an H100)."""
        cfg = m.launch_config(n)
        h = x if r is None else promote(x, r)
        has_dr = r is not None and r != x
        args = dict(
            DY=Ptr(h), DH_IN=Ptr(h), H=Ptr(h), W=Ptr(w or h), RSTD=Ptr("fp32"), DX=Ptr(x),
            DR=Ptr(r if has_dr else x), DW_PARTIAL=Ptr("fp32"),
            stride_dy=n, stride_dh_in=n if r else 0, stride_h=n, stride_dx=n,
            stride_dr=n if has_dr else 0,
            n_rows=n_rows, n_cols=n, rows_per_program=triton.cdiv(n_rows, programs))
        flags = dict(HAS_DH_IN=r is not None, HAS_DR=has_dr, HAS_WEIGHT=w is not None,
                     ZERO_CENTERED=zc, BLOCK_N=cfg["BLOCK_N"], ONE_BLOCK=cfg["ONE_BLOCK"])
        sig, const, div = specialise(bwd_params, args, flags)
        label = _label(n, x, r, w, zc, note)
        return AotCase("_rms_norm_bwd_kernel", bwd, sig, const, cfg["num_warps"], None, div,
                       label)

    out: list[AotCase] = []
    # 1. Every launch configuration (block, loop flag, warps) the launchers can pick for a
    #    hidden size up to 128K, in bf16 with the Llama pre-norm flags (residual, weight), in
    #    both specialisations real shapes get: n (so the row strides) a multiple of 16, as for
    #    4096, and not, as for 4097. Fresh tensors are 16-byte aligned in both.
    for sizes in distinct_launch_configs(m.launch_config, 131072).values():
        for n in (max((s for s in sizes if s % 16 == 0), default=None),
                  max((s for s in sizes if s % 16 and s > 1), default=None)):
            if n is not None:
                out.append(fwd_case(n, "bf16", r="bf16", w="bf16"))
                out.append(bwd_case(n, "bf16", r="bf16", w="bf16"))
    # 2. Every combination of the flags, in each dtype, at one size per code path: 4096 (one
    #    block) for all three dtypes, 32768 (looping over blocks) in bf16.
    weights = [(None, False), ("w", False), ("w", True)]  # zero-centred needs a weight
    for n, dtypes in ((4096, ("fp32", "fp16", "bf16")), (32768, ("bf16",))):
        for dt in dtypes:
            for residual in (None, dt):
                for w, zc in weights:
                    out.append(fwd_case(n, dt, r=residual, w=w and dt, zc=zc))
                    out.append(bwd_case(n, dt, r=residual, w=w and dt, zc=zc))
    # 3. Mixed dtypes the op allows: fp32 weights with bf16 activations; a residual stream of
    #    another dtype (h, y promoted; dr written separately: HAS_DR); fp16 with bf16 → fp32.
    for x, r, w in (("bf16", None, "fp32"), ("bf16", "fp32", "fp32"), ("fp32", "bf16", "bf16"),
                    ("fp16", "bf16", "fp32")):
        for n in (4096, 32768):
            out.append(fwd_case(n, x, r=r, w=w))
            out.append(bwd_case(n, x, r=r, w=w))
    out.append(bwd_case(4096, "bf16", r="fp32", w="bf16", zc=True))
    # 4. Specialisations of small or odd launches: a hidden size of 1 (n_cols and the strides
    #    become the constexpr 1), one row per backward program (rows_per_program = 1: up to
    #    4 rows per SM), a single row, and an x viewed at an odd offset (pointer not aligned).
    out.append(fwd_case(1, "bf16", r="bf16", w="bf16"))
    out.append(bwd_case(1, "bf16", r="bf16", w="bf16"))
    out.append(bwd_case(4096, "bf16", r="bf16", w="bf16", n_rows=300, note="300 rows"))
    out.append(bwd_case(4097, "bf16", w="bf16", n_rows=1, programs=1, note="1 row"))
    out.append(fwd_case(4097, "bf16", w="bf16", x_aligned=False, note="x misaligned"))
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
    seqlen_offsets. ``q_aligned`` False: q is a view at an odd element offset.
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
    n_seqs = cu_seqlens[1] if cu_seqlens else 1
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
    if position_ids:  # (batch, seq) contiguous; a leading 1 (shared, or thd) gives stride 0
        mode = 2
        pos_strides = (seq if batch > 1 and not shared_positions and layout != "thd" else 0, 1)
    else:
        mode, pos_strides = (1 if offsets else 0), (0, 0)
    args: dict[str, Any] = dict(
        Q=q, K=k, OUT_Q=out_q, OUT_K=out_k,
        COS=Ptr(table), SIN=Ptr(table),
        POSITION_IDS=Ptr(position_ids or table), OFFSETS=Ptr(offsets or table),
        CU_SEQLENS=Ptr(cu_seqlens[0] if cu_seqlens else table),
        n_tokens=n_tokens, n_inner=n_inner,
        n_q_heads=q_heads, n_k_heads=k_heads, q_groups=triton.cdiv(q_heads, heads),
        heads_per_program=heads, head_dim=head_dim, stride_cos=half,
        n_positions=n_positions, offset=offset,
        stride_pos_batch=pos_strides[0], stride_pos_seq=pos_strides[1],
        n_seqs=n_seqs, search_steps=(n_seqs - 1).bit_length())
    for prefix, values in (("q", q_strides), ("k", k_strides), ("oq", q_strides),
                           ("ok", k_strides)):
        args.update({f"stride_{prefix}_{axis}": v
                     for axis, v in zip(("outer", "inner", "head"), values, strict=True)})
    flags = dict(POSITIONS=mode, VARLEN=cu_seqlens is not None, BATCH_FIRST=layout != "sbhd",
                 INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail,
                 HALF=cfg["HALF"], BLOCK_T=cfg["BLOCK_T"], BLOCK_HALF=cfg["BLOCK_HALF"],
                 BLOCK_TAIL=cfg["BLOCK_TAIL"])
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
        # positions: explicit ids (per sequence, shared, int32), offsets per sequence, a
        # scalar offset (KV cache) not divisible by 16
        dict(batch=2, position_ids="i64"),
        dict(batch=2, position_ids="i64", shared_positions=True),
        dict(batch=2, position_ids="i32"),
        dict(batch=2, offsets="i64"),
        dict(batch=2, offsets="i32"),
        dict(offset=17),
        dict(offset=4096),
        # sbhd (Megatron): micro-batch 1 makes n_inner the constexpr 1
        dict(layout="sbhd"),
        dict(layout="sbhd", batch=2),
        # packed sequences: cu_seqlens int32 (flash-attn's) and int64, one sequence (no
        # bisection step), offsets per sequence; thd without cu_seqlens, with position ids
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
    lse_strides = (0, seqlen_q) if varlen else (heads * seqlen_q, seqlen_q)
    cu = Ptr(cu_seqlens[0]) if varlen else Ptr(dtype)  # not varlen: q stands in
    tensors = {name: Ptr(dtype) for name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    tensors.update(LSE=Ptr("fp32"), DELTA=Ptr("fp32"), CU_Q=cu, CU_K=cu)
    stride_of = {"q": q_strides, "o": q_strides, "do": q_strides, "dq": q_strides,
                 "k": kv_strides, "v": kv_strides, "dk": kv_strides, "dv": kv_strides}
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
            elif name in ("stride_lb", "stride_lh"):
                args[name] = lse_strides[name == "stride_lh"]
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


def _swiglu_case(*, backward: bool, n: int, dtype: str = "bf16", fused: bool = False,
                 gate_aligned: bool = True, dy_stride: int | None = None,
                 note: str = "") -> AotCase:
    """One kernel of ``eurocore.kernels.swiglu`` as the op launches it on rows of ``n``
    (a test compares it with the real launchers' launches).

    gate and up: contiguous (rows, n), or with ``fused`` the two halves of a contiguous
    (rows, 2n) gate/up projection (row stride 2n; up starts n elements in, so it is aligned
    only when n elements are a multiple of 16 bytes). ``gate_aligned`` False: gate is a view
    at an odd element offset. The output and the gradients are fresh contiguous tensors;
    the backward's dy is autograd's (contiguous), or expanded rows with ``dy_stride`` 0.
    """
    from eurocore.kernels import swiglu as m

    cfg = m.launch_config(n)
    size = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    stride_in = 2 * n if fused else n
    gate = Ptr(dtype, gate_aligned)
    up = Ptr(dtype, not fused or (n * size) % 16 == 0)
    if backward:
        kernel = m._swiglu_bwd_kernel
        args: dict[str, Any] = dict(
            DY=Ptr(dtype), G=gate, U=up, DG=Ptr(dtype), DU=Ptr(dtype),
            stride_dy=n if dy_stride is None else dy_stride, stride_g=stride_in,
            stride_u=stride_in, stride_dg=n, stride_du=n, n_cols=n)
    else:
        kernel = m._swiglu_fwd_kernel
        args = dict(G=gate, U=up, Y=Ptr(dtype), stride_g=stride_in, stride_u=stride_in,
                    stride_y=n, n_cols=n)
    sig, const, div = specialise(kernel_params(kernel), args, {"BLOCK_N": cfg["BLOCK_N"]})
    parts = [f"n={n}", dtype]
    parts += [name for name, on in (("bwd", backward), ("fused gate/up", fused),
                                    ("gate misaligned", not gate_aligned),
                                    ("dy expanded", dy_stride == 0)) if on]
    if note:
        parts.append(note)
    name = "_swiglu_bwd_kernel" if backward else "_swiglu_fwd_kernel"
    return AotCase(name, kernel, sig, const, cfg["num_warps"], None, div, " ".join(parts))


# Intermediate sizes of real models: Llama-3-8B 14336, EuroLLM-9B 12288, Llama-2-7B 11008,
# Llama-3-70B 28672; 14336 first: its labels survive dedupe.
SWIGLU_SIZES = (14336, 12288, 11008, 28672)
# The largest row the launch-configuration sweep goes to: past MAX_BLOCK_N rows only add
# programs, never a configuration.
SWIGLU_SWEEP_N = 65536


def _swiglu_cases() -> list[AotCase]:
    from eurocore.kernels import swiglu as m

    def both(**config: Any) -> list[AotCase]:
        return [_swiglu_case(backward=False, **config), _swiglu_case(backward=True, **config)]

    out: list[AotCase] = []
    # 1. Every launch configuration (block, warps), in bf16 on contiguous rows, with n (so
    #    the row strides) a multiple of 16 and not; n = 1 makes n_cols and the strides the
    #    constexpr 1.
    for sizes in distinct_launch_configs(m.launch_config, SWIGLU_SWEEP_N).values():
        for n in (max((s for s in sizes if s % 16 == 0), default=None),
                  max((s for s in sizes if s % 16), default=None)):
            if n is not None:
                out += both(n=n)
    # 2. The real models' sizes in every dtype, contiguous and as the halves of a fused
    #    gate/up projection.
    for n, dtype, fused in itertools.product(SWIGLU_SIZES, ("bf16", "fp16", "fp32"),
                                             (False, True)):
        out += both(n=n, dtype=dtype, fused=fused)
    # 3. Specialisations of odd launches: fused halves of an odd size (up misaligned, row
    #    strides not multiples of 16), a misaligned gate, an expanded output gradient.
    out += both(n=4097, fused=True)
    out += both(n=4097, dtype="fp32", fused=True)
    out += both(n=14336, gate_aligned=False)
    out += both(n=4097, gate_aligned=False)
    out.append(_swiglu_case(backward=True, n=4097, dy_stride=0))
    out.append(_swiglu_case(backward=True, n=14336, dy_stride=0))
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


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


def target_name(target: GPUTarget) -> str:
    for name, known in TARGETS.items():
        if known == target:
            return name
    return f"sm_{target.arch}" if target.backend == "cuda" else str(target.arch)


def has_backend(target: GPUTarget) -> bool:
    """Whether this Triton can compile for the target: PyPI wheels carry the NVIDIA and AMD
    backends; a vendor build (pytorch-triton-rocm) may carry only its own."""
    from triton.backends import backends

    return any(b.compiler.supports_target(target) for b in backends.values())


def check_launch(case: AotCase, target: GPUTarget) -> None:
    """Raises LaunchSizeError when a program of this case has more threads than the target's
    hardware limit: 16 warps fill it with AMD's 64-wide wavefronts, 32 with NVIDIA's warps."""
    threads = case.num_warps * target.warp_size
    if threads > MAX_THREADS_PER_BLOCK:
        raise LaunchSizeError(
            f"{case.kernel} [{case.label}] with num_warps={case.num_warps} launches "
            f"{case.num_warps} x {target.warp_size} = {threads} threads per program on "
            f"{target_name(target)}, over the hardware limit of {MAX_THREADS_PER_BLOCK} "
            f"(at most {MAX_THREADS_PER_BLOCK // target.warp_size} warps there); "
            f"constexprs {case.constexprs}")


def compile_case(case: AotCase, target: GPUTarget) -> AotReport:
    """Compiles one case for one target; raises LaunchSizeError or AotCompileError, and
    ValueError for a target of a vendor the case is not launched on (:meth:`AotCase.applies_to`).

    A kernel defined under the interpreter is compiled in a fresh worker process (see the
    module docstring); a LaunchSizeError is raised here either way, before any compilation.
    """
    if not case.applies_to(target):
        raise ValueError(f"{case} is launched only on {', '.join(case.vendors)} GPUs, not on "
                         f"{target_name(target)}")
    check_launch(case, target)
    if isinstance(case.fn, JITFunction):
        try:
            return _compile(case, target)
        except Exception as e:  # Triton raises many types; name the case and the target
            raise AotCompileError(f"{case} on {target_name(target)}: {_describe(e)}") from e
    (result,) = compile_all([case], [target], jobs=1)
    if isinstance(result, AotFailure):
        raise AotCompileError(str(result))
    return result


def compile_all(items: Sequence[AotCase], targets: Sequence[GPUTarget], jobs: int = 1
                ) -> list[AotReport | AotFailure]:
    """Compiles every case for every target it applies to (case-major order; a case naming
    vendors skips the other vendor's targets, see :meth:`AotCase.applies_to`), never raising
    for one case.

    ``jobs`` > 1 compiles in that many worker processes. Interpreted kernels always go to
    worker processes, started without TRITON_INTERPRET.
    """
    work = [(case, target) for case in items for target in targets if case.applies_to(target)]
    interpreted = any(not isinstance(case.fn, JITFunction) for case in items)
    if not work:
        return []
    if jobs <= 1 and not interpreted:
        return [_try_compile(case, target) for case, target in work]
    workers = max(1, min(jobs, len(work)))
    ctx = multiprocessing.get_context("spawn")  # fork would inherit interpreted kernels
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool, \
            _env(TRITON_INTERPRET=None):  # the workers start (on submit) with a clean env
        futures = [pool.submit(_try_compile, case, target) for case, target in work]
        return [f.result() for f in futures]


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # belt and braces: _env removed it already
    # Triton 3.9 warns once per process about a default changing in 3.10 (pyproject.toml
    # filters it under pytest); once per worker is noise.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")


def _try_compile(case: AotCase, target: GPUTarget) -> AotReport | AotFailure:
    name = target_name(target)
    try:
        check_launch(case, target)
        if not isinstance(case.fn, JITFunction):
            raise AotCompileError(
                f"{case.kernel} is a {type(case.fn).__name__}, not a JITFunction: its module "
                f"was imported under TRITON_INTERPRET=1 in this process")
        return _compile(case, target)
    except Exception as e:
        return AotFailure(case.kernel, case.label, name, case.num_warps, _describe(e))


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) < 4000 else text[:4000] + " ..."


def _compile(case: AotCase, target: GPUTarget) -> AotReport:
    names = kernel_params(case.fn)
    if list(case.signature) != names:
        raise ValueError(f"{case.kernel}: signature names {list(case.signature)} differ from "
                         f"the kernel's parameters {names}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case.divisible}
    src = ASTSource(case.fn, dict(case.signature), dict(case.constexprs), attrs=attrs)
    options: dict[str, Any] = {**case.options, "num_warps": case.num_warps}
    if case.num_stages is not None:
        options["num_stages"] = case.num_stages
    log = io.StringIO()
    if target.backend == "cuda":
        # Triton prints ptxas -v (registers, spills) to stdout with TRITON_DUMP_PTXAS_LOG; a
        # cache hit would skip ptxas, so this compile bypasses the cache.
        with _env(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1"), \
                contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
    else:
        compiled = triton.compile(src, target=target, options=options)
    report = AotReport(case.kernel, case.label, target_name(target), case.num_warps,
                       shared=int(compiled.metadata.shared), widest_load=0)
    if "ptx" in compiled.asm:
        report.loads, report.widest_load = ptx_global_loads(compiled.asm["ptx"])
        report.regs, report.spill_bytes = parse_ptxas_log(log.getvalue())
    if "amdgcn" in compiled.asm:
        amdgcn = compiled.asm["amdgcn"]
        report.loads, report.widest_load = amdgcn_global_loads(amdgcn)
        meta = amdgcn_metadata(amdgcn)
        report.vgpr, report.sgpr, report.agpr = (meta.get(k) for k in
                                                 ("vgpr_count", "sgpr_count", "agpr_count"))
        report.vgpr_spill = meta.get("vgpr_spill_count")
        report.sgpr_spill = meta.get("sgpr_spill_count")
    check_resources(case, report, target)
    return report


def check_resources(case: AotCase, report: AotReport, target: GPUTarget) -> None:
    """Raises LaunchResourceError when the compiled program would not load on the target: more
    shared memory than a block may have, or (NVIDIA) more registers than the register file
    holds for the block: what Triton reports as OutOfResources at the first launch."""
    name = target_name(target)
    limit = MAX_SHARED.get(name)
    if limit is not None and report.shared > limit:
        raise LaunchResourceError(
            f"{case.kernel} [{case.label}] with num_warps={case.num_warps} needs "
            f"{report.shared} bytes of shared memory per program on {name}, over its "
            f"{limit}; constexprs {case.constexprs}")
    if report.regs is not None:
        per_warp = -(-report.regs * target.warp_size // 256) * 256
        if per_warp * case.num_warps > NVIDIA_REGISTER_FILE:
            raise LaunchResourceError(
                f"{case.kernel} [{case.label}]: {report.regs} registers x "
                f"{case.num_warps * target.warp_size} threads exceed the {NVIDIA_REGISTER_FILE}"
                f" registers of an SM on {name}; constexprs {case.constexprs}")


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Sets (or, for None, removes) environment variables for the duration."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Reading the compiler's output
# ---------------------------------------------------------------------------------------------

_PTX_LOAD = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*)")
_AMD_LOAD = re.compile(r"\b(?:global|buffer)_load_(dwordx[234]|dword|b128|b96|b64|b32|"
                       r"[us]?short(?:_d16(?:_hi)?)?|[us]?byte(?:_d16(?:_hi)?)?|[ui](?:8|16))\b")
_AMD_BYTES = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8,
              "dword": 4, "b32": 4}


def ptx_global_loads(ptx: str) -> tuple[tuple[str, ...], int]:
    """The distinct global loads in PTX and the widest in bytes (``ld.global.v4.b32``: 16)."""
    kinds = sorted({"ld.global" + m.group(1) for m in _PTX_LOAD.finditer(ptx)})
    widest = 0
    for kind in kinds:
        parts = kind.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 0)
        widest = max(widest, vec * bits // 8)
    return tuple(kinds), widest


def amdgcn_global_loads(amdgcn: str) -> tuple[tuple[str, ...], int]:
    """The distinct global/buffer loads in AMDGCN and the widest in bytes (dwordx4: 16)."""
    kinds = sorted({m.group(0) for m in _AMD_LOAD.finditer(amdgcn)})
    widest = 0
    for kind in kinds:
        suffix = kind.split("_load_", 1)[1]
        size = _AMD_BYTES.get(suffix)
        if size is None:
            size = 2 if "short" in suffix or suffix.endswith("16") else 1
        widest = max(widest, size)
    return tuple(kinds), widest


def amdgcn_metadata(amdgcn: str) -> dict[str, int]:
    """Register and spill counts from the AMDGCN kernel metadata (``.vgpr_count: 23`` ...)."""
    return {k: int(v) for k, v in re.findall(
        r"\.(vgpr_count|sgpr_count|agpr_count|vgpr_spill_count|sgpr_spill_count):\s+(\d+)",
        amdgcn)}


def parse_ptxas_log(log: str) -> tuple[int | None, int | None]:
    """(registers, spill store + load bytes) from ``ptxas -v`` output; None where absent."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)
