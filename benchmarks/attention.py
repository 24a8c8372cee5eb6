"""Flash attention benchmark cases: eurocore against PyTorch SDPA (its flash and cuDNN
backends) and flash-attn 2.

Variants: "fwd" (inputs without grad: the forward alone), "bwd" (the backward alone: the
graph is built once, then ``torch.autograd.grad(..., retain_graph=True)`` is timed) and
"fwd+bwd". q, k, v are (batch, seq, heads, head_dim) (bshd, flash-attn's layout), softmax
scale 1/sqrt(head_dim), causal or not (the shape's ``causal`` is 1 or 0).

GPU shapes: bf16, 16384 tokens per batch (batch = 16384 / seq, seq 1024 .. 16384) and a
hidden size of 2048 split into heads: 32 heads of 64 or 16 heads of 128, kv_heads = heads
(plain MHA), plus one GQA point (16 query heads, 4 kv heads of 128, seq 4096, causal).
``--quick`` on a GPU: seq 4096 with 16 heads of 128 (MHA, causal and not), then Llama's
attention (32 query heads, 8 kv heads of 128): seq 4096 causal and not, and seq 16384 causal.
Cases run shape by shape, every variant of a shape before the next shape, so a run cut
short by its deadline holds whole shapes.

FLOPs (docs/design.md, "Performance methodology"), with b the batch, h the query heads, sq and
sk the sequence lengths and d the head dim:
    fwd      4·b·h·sq·sk·d (q·kᵀ and p·v, 2·sq·sk·d each per head), halved when causal
    bwd      2.5 x fwd (five matmuls: q·kᵀ recomputed, dv, dp, dq, dk)
    fwd+bwd  3.5 x fwd

Fewest bytes, with e the element size and hq, hk the query and kv heads:
    fwd      read q, k and v, write out                        (2·b·sq·hq + 2·b·sk·hk)·d·e
    bwd      read q, k, v, out, dout and the fp32 log-sum-exp,
             write dq, dk and dv                                (4·b·sq·hq + 4·b·sk·hk)·d·e
                                                                + 4·b·hq·sq
    fwd+bwd  the sum of the two

Each implementation gets the inputs in the form it takes, converted outside the timing:
eurocore and flash-attn the bshd tensors; SDPA (batch, heads, seq, head_dim) views of the
same storage (``transpose(1, 2)``, no copy), as HF's attention hands them. An SDPA backend is
pinned with ``torch.nn.attention.sdpa_kernel`` around the call; on a GPU each is first tried
on a small input of the case's head dim, masking and grouping, and listed as skipped with
its error where it cannot run (cuDNN is replaced by the memory-efficient backend then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import harness
from .harness import Case, _first_line

OP = "attention"
VARIANTS = ("fwd", "bwd", "fwd+bwd")

# GPU: 16384 tokens per batch at a hidden size of 2048 (heads = 2048 / head_dim), MHA.
GPU_TOKENS = 16384
GPU_HIDDEN = 2048
GPU_SEQLENS = (1024, 2048, 4096, 8192, 16384)
GPU_HEAD_DIMS = (64, 128)
GPU_QUICK_SEQLENS = (4096,)  # --quick on a GPU: one sequence length, head_dim 128
GPU_QUICK_HEAD_DIMS = (128,)
GPU_GQA = dict(seq=4096, heads=16, kv_heads=4, head_dim=128)  # group 4, causal; full run only
# --quick on a GPU, after the MHA points: Llama-3-8B's attention (32 query heads, 8 kv heads
# of 128) at 16384 tokens per batch, as (seq, causal).
GPU_QUICK_LLAMA = dict(heads=32, kv_heads=8, head_dim=128)
GPU_QUICK_LLAMA_SEQS = ((4096, False), (4096, True), (16384, True))
# The CPU only checks the harness end to end: small fp32 shapes that finish in seconds.
CPU_BATCH = 2
CPU_SEQLENS = (128, 256)
CPU_HEADS = 4
CPU_HEAD_DIM = 64
# Where an SDPA backend is tried before its cases are listed (GPU only).
_PROBE_SEQ = 128

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (q, k, v) bshd -> (q, k, v) in the implementation's form (the gradients' leaves)
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tensors]
# (q, k, v) in that form -> the attention output
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """An implementation for one masking: ``prepare`` converts the common bshd inputs outside
    the timing, ``forward`` is what is timed."""

    prepare: Prepare
    forward: Forward


# causal -> Impl: made when the case runs
MakeImpl = Callable[[bool], Impl]


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool, variant: str) -> int:
    """FLOPs of one call: 4·b·h·sq·sk·d forward, halved when causal; the backward 2.5x and
    forward plus backward 3.5x the forward (docs/design.md)."""
    fwd = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        fwd //= 2
    if variant == "fwd":
        return fwd
    if variant == "bwd":
        return 5 * fwd // 2
    if variant == "fwd+bwd":
        return 7 * fwd // 2
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def fwd_bytes(batch: int, seqlen_q: int, seqlen_k: int, heads: int, kv_heads: int,
              head_dim: int, element_size: int) -> int:
    """Reads q, k and v, writes out."""
    return (2 * batch * seqlen_q * heads + 2 * batch * seqlen_k * kv_heads) * head_dim \
        * element_size


def bwd_bytes(batch: int, seqlen_q: int, seqlen_k: int, heads: int, kv_heads: int,
              head_dim: int, element_size: int) -> int:
    """Reads q, k, v, out, dout and the fp32 log-sum-exp, writes dq, dk and dv."""
    return (4 * batch * seqlen_q * heads + 4 * batch * seqlen_k * kv_heads) * head_dim \
        * element_size + 4 * batch * heads * seqlen_q


def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> Tensors:
    """Fresh random normal q (batch, seq, heads, head_dim), k and v (.., kv_heads, ..)."""
    q = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seq, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seq, kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v


def _setup(make_impl: MakeImpl, variant: str, causal: bool, batch: int, seq: int, heads: int,
           kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
           ) -> Callable[[], Callable[[], object]]:
    """The case's setup: the implementation, fresh inputs (:func:`make_inputs`) in its form,
    then the callable that runs ``variant``."""

    def setup() -> Callable[[], object]:
        impl = make_impl(causal)
        q, k, v = impl.prepare(*make_inputs(batch, seq, heads, kv_heads, head_dim, dtype,
                                            device))
        if variant == "fwd":
            return lambda: impl.forward(q, k, v)
        # Leaves in the implementation's layout; the output gradient gets the output's.
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        if variant == "bwd":
            out = impl.forward(q, k, v)
            dout = torch.randn_like(out)
            return lambda: torch.autograd.grad(out, (q, k, v), grad_outputs=dout,
                                               retain_graph=True)
        if variant == "fwd+bwd":
            with torch.no_grad():
                dout = torch.randn_like(impl.forward(q, k, v))
            return lambda: torch.autograd.grad(impl.forward(q, k, v), (q, k, v),
                                               grad_outputs=dout)
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    return setup


def _identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    return q, k, v


def _to_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    """(batch, heads, seq, head_dim) views of the bshd storage (no copy)."""
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _eurocore(backend: str) -> MakeImpl:
    """eurocore's attention on one backend, chosen explicitly."""
    from eurocore.ops import flash_attention

    def make(causal: bool) -> Impl:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flash_attention(q, k, v, causal=causal, backend=backend)

        return Impl(_identity, forward)

    return make


def _sdpa_backends() -> dict[str, object]:
    """SDPA backend label -> ``SDPBackend`` member, for those this torch has."""
    from torch.nn.attention import SDPBackend

    names = {"sdpa/flash": "FLASH_ATTENTION", "sdpa/cudnn": "CUDNN_ATTENTION",
             "sdpa/efficient": "EFFICIENT_ATTENTION", "sdpa/math": "MATH"}
    return {label: getattr(SDPBackend, name) for label, name in names.items()
            if hasattr(SDPBackend, name)}


def _sdpa(backend: object, gqa: bool) -> MakeImpl:
    """SDPA pinned to ``backend`` (``torch.nn.attention.sdpa_kernel``) on bhsd views;
    ``enable_gqa`` only for grouped heads (older torch lacks the argument)."""
    from torch.nn.attention import sdpa_kernel

    extra = {"enable_gqa": True} if gqa else {}

    def make(causal: bool) -> Impl:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, **extra)

        return Impl(_to_bhsd, forward)

    return make


def _flash_attn() -> tuple[MakeImpl | None, str | None]:
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # not installed, or built against another torch
        return None, f"flash_attn not importable ({type(err).__name__}: {err})"

    def make(causal: bool) -> Impl:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flash_attn_func(q, k, v, causal=causal)

        return Impl(_identity, forward)

    return make, None


def try_impl(make_impl: MakeImpl, causal: bool, heads: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> str | None:
    """Runs the implementation's forward and backward once on a small input of this head
    dim, masking and grouping; returns None, or the error's first line when it fails."""
    try:
        impl = make_impl(causal)
        inputs = make_inputs(1, _PROBE_SEQ, heads, kv_heads, head_dim, dtype, device)
        q, k, v = (t.requires_grad_(True) for t in impl.prepare(*inputs))
        out = impl.forward(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    except Exception as err:  # "No available kernel", unsupported head dim or dtype, ...
        return _first_line(err)
    return None


def _sdpa_impls(gpu: bool, causal: bool, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device, probe: bool
                ) -> list[tuple[str, MakeImpl | None, str | None, str]]:
    """(label, implementation or None, skip reason, note) for each SDPA backend benchmarked:
    flash and cuDNN (else memory-efficient) on a GPU, math on the CPU. ``probe``: try each
    on a small input first (:func:`try_impl`; needs the device)."""
    backends = _sdpa_backends()
    gqa = kv_heads != heads
    if not gpu:
        return [("sdpa/math", _sdpa(backends["sdpa/math"], gqa), None, "")]
    out: list[tuple[str, MakeImpl | None, str | None, str]] = []
    for wanted in ("sdpa/flash", "sdpa/cudnn"):
        label, note = wanted, ""
        if label not in backends:
            out.append((label, None, f"this torch has no SDPBackend for {label}", ""))
            continue
        make = _sdpa(backends[label], gqa)
        reason = try_impl(make, causal, heads, kv_heads, head_dim, dtype, device) if probe \
            else None
        if reason is not None and label == "sdpa/cudnn" and "sdpa/efficient" in backends:
            note = f"cuDNN attention unavailable ({reason}): memory-efficient SDPA instead"
            label, make = "sdpa/efficient", _sdpa(backends["sdpa/efficient"], gqa)
            reason = try_impl(make, causal, heads, kv_heads, head_dim, dtype, device)
        out.append((label, None if reason else make, reason, note))
    return out


@dataclass(frozen=True)
class _Shape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    def as_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "seq": self.seq, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "causal": int(self.causal)}


def gpu_shapes(quick: bool) -> list[dict[str, int]]:
    """The GPU grid (see the module docstring), as Case shapes."""
    seqlens = GPU_QUICK_SEQLENS if quick else GPU_SEQLENS
    head_dims = GPU_QUICK_HEAD_DIMS if quick else GPU_HEAD_DIMS
    shapes = [_Shape(GPU_TOKENS // seq, seq, GPU_HIDDEN // d, GPU_HIDDEN // d, d, causal)
              for d in head_dims for causal in (False, True) for seq in seqlens]
    if not quick:
        g = GPU_GQA
        shapes.append(_Shape(GPU_TOKENS // g["seq"], g["seq"], g["heads"], g["kv_heads"],
                             g["head_dim"], True))
    else:
        g = GPU_QUICK_LLAMA
        shapes += [_Shape(GPU_TOKENS // seq, seq, g["heads"], g["kv_heads"], g["head_dim"],
                          causal) for seq, causal in GPU_QUICK_LLAMA_SEQS]
    return [s.as_dict() for s in shapes]


def cpu_shapes() -> list[dict[str, int]]:
    """Small fp32 shapes for the CPU: the harness end to end, in seconds."""
    return [_Shape(CPU_BATCH, seq, CPU_HEADS, CPU_HEADS, CPU_HEAD_DIM, causal).as_dict()
            for causal in (False, True) for seq in CPU_SEQLENS]


def cases(device: torch.device | str, quick: bool) -> list[Case]:
    """The attention cases for ``device``: every implementation, shape and variant.

    On a GPU: bf16, the grid of :func:`gpu_shapes` (quick: seq 4096, head_dim 128, causal and
    not, then Llama's GQA at 4096 and 16384), for eurocore (auto's backend), SDPA flash, SDPA
    cuDNN (else memory-efficient) and flash-attn; each SDPA backend is tried on a small input
    first where the device is present, and listed as skipped with its error where it fails. On
    the CPU: float32 (CPU bf16 is not representative; the dtype field says float32),
    :func:`cpu_shapes`, eurocore's auto backend (torch, the reference; triton under the
    interpreter is skipped) and SDPA's math backend; the GPU implementations are listed as
    skipped.

    Returns:
        Cases to run, plus skipped cases (``Case.skip`` set) naming what is left out and why.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    probe = gpu and torch.cuda.is_available()  # listing GPU cases needs no GPU
    dtype, dtype_name, note = harness.case_dtype(device)
    shapes = gpu_shapes(quick) if gpu else cpu_shapes()
    out: list[Case] = []

    fixed: list[tuple[str, MakeImpl]] = []  # implementations that do not depend on the shape
    from eurocore.ops.attention import IMPLEMENTED

    for label, backend, reason in harness.eurocore_backends("flash_attention", device,
                                                            IMPLEMENTED):
        if backend is None:
            out.append(Case.skipped(OP, label, reason or "unavailable", dtype=dtype_name))
        else:
            fixed.append((label, _eurocore(backend)))
    if gpu:
        make, reason = _flash_attn()
        if make is None:
            out.append(Case.skipped(OP, "flash-attn", reason or "unavailable",
                                    dtype=dtype_name))
        else:
            fixed.append(("flash-attn", make))
    else:
        for name in ("sdpa/flash", "sdpa/cudnn", "flash-attn"):
            out.append(Case.skipped(OP, name, "GPU-only implementation", dtype=dtype_name))

    element_size = torch.empty((), dtype=dtype).element_size()
    probed: dict[tuple, list] = {}
    # shape by shape: a run stopped at its deadline holds every variant of the shapes done
    for shape in shapes:
        for variant in VARIANTS:
            b, s, h, hk, d = (shape[k] for k in ("batch", "seq", "heads", "kv_heads",
                                                  "head_dim"))
            causal = bool(shape["causal"])
            fwd = fwd_bytes(b, s, s, h, hk, d, element_size)
            bwd = bwd_bytes(b, s, s, h, hk, d, element_size)
            nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[variant]
            flops = attention_flops(b, h, s, s, d, causal, variant)
            key = (causal, h, hk, d)
            if key not in probed:
                probed[key] = _sdpa_impls(gpu, causal, h, hk, d, dtype, device, probe)
            impls = [(name, make_impl, None, note) for name, make_impl in fixed]
            impls += [(name, make_impl, reason, "; ".join(x for x in (note, extra) if x))
                      for name, make_impl, reason, extra in probed[key]]
            for name, make_impl, reason, case_note in impls:
                if make_impl is None:
                    out.append(Case.skipped(OP, name, reason or "unavailable",
                                            variant=variant, shape=shape, dtype=dtype_name))
                    continue
                out.append(Case(
                    op=OP, variant=variant, shape=shape, dtype=dtype_name, impl=name,
                    setup=_setup(make_impl, variant, causal, b, s, h, hk, d, dtype, device),
                    bytes=nbytes, flops=flops, note=case_note,
                ))
    return out
