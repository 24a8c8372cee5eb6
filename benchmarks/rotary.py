"""Rotary embedding benchmark cases: eurocore against torch eager, torch.compile, Liger and
flash-attn, rotating q and k of a Llama-3-8B / EuroLLM-9B attention layer together.

Variants: "fwd" (inputs without grad: the forward alone), "bwd" (the backward alone: the
graph is built once, then ``torch.autograd.grad(..., retain_graph=True)`` is timed) and
"fwd+bwd". q is (batch, seq, 32, 128) and k (batch, seq, 8, 128) in ``bshd`` (each
sequence 4096 tokens, batch = tokens / 4096), rotate-half, positions 0 .. seq - 1 of a
fp32 cos/sin table (4096, 64) made by ``rope_cos_sin`` (theta 500000, Llama 3's).

Fewest bytes, with e the element size, T = batch·seq tokens, Hq and Hk the head counts, D
the head dim and S = seq the table rows used (cos and sin, D/2 fp32 values each):
    fwd      read q and k, write them rotated,
             read the cos/sin rows used once                 2·T·(Hq + Hk)·D·e + 2·S·(D/2)·4
    bwd      read dq_out and dk_out, write dq and dk,
             read the table rows                             the same
    fwd+bwd  the sum of the two

Each implementation gets the inputs in the form it takes, converted outside the timing:
eurocore and flash-attn the half-width (S, D/2) table (fp32 for eurocore; flash-attn
requires the tables in q's dtype), torch eager / torch.compile and Liger HF's duplicated
full-width cos/sin (1, S, D) in q's dtype, as HF's rotary module hands every layer; Liger
takes q and k as (batch, heads, seq, head_dim), here transposed views of the same bshd
storage (no copy). flash-attn rotates one tensor per call, so its case makes two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import harness
from .harness import Case

OP = "rotary"
VARIANTS = ("fwd", "bwd", "fwd+bwd")
THETA = 500000.0  # Llama 3's rope_theta
MAX_SEQ = 4096  # one sequence (and the cos/sin table) of at most this many positions

# GPU: Llama-3-8B / EuroLLM-9B attention (32 query heads, 8 key heads of 128) over token
# counts per micro-batch, in sequences of 4096.
GPU_TOKENS = (4096, 16384, 65536)
GPU_QUICK_TOKENS = (16384,)  # --quick on a GPU: tiny shapes there would time launch latency
GPU_HEADS = (32, 8, 128)  # (q heads, k heads, head_dim)
# The CPU only checks the harness end to end: small shapes that finish in seconds.
CPU_TOKENS = (256, 1024)
CPU_HEADS = (8, 2, 128)

Tensors = tuple[torch.Tensor, ...]
# (q, k) in bshd, cos, sin (S, D/2) fp32 -> (q_in, k_in, *tables): what `forward` takes,
# q_in and k_in being the tensors the gradients are taken with respect to.
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Tensors]
# (q_in, k_in, *tables) -> (q rotated, k rotated)
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Impl:
    """An implementation: ``prepare`` converts the common inputs outside the timing,
    ``forward`` is what is timed."""

    prepare: Prepare
    forward: Forward


def split_tokens(tokens: int) -> tuple[int, int]:
    """(batch, seq): sequences of ``MAX_SEQ`` tokens, or one sequence of fewer."""
    seq = min(tokens, MAX_SEQ)
    if tokens % seq:
        raise ValueError(f"tokens: expected a multiple of {MAX_SEQ} or fewer, got {tokens}")
    return tokens // seq, seq


def fwd_bytes(tokens: int, seq: int, q_heads: int, k_heads: int, head_dim: int,
              element_size: int) -> int:
    """Reads q and k, writes them rotated, reads the ``seq`` fp32 cos/sin rows once."""
    table = 2 * seq * (head_dim // 2) * 4  # cos and sin, fp32
    return 2 * tokens * (q_heads + k_heads) * head_dim * element_size + table


def bwd_bytes(tokens: int, seq: int, q_heads: int, k_heads: int, head_dim: int,
              element_size: int) -> int:
    """Reads dq_out and dk_out, writes dq and dk, reads the cos/sin rows once."""
    return fwd_bytes(tokens, seq, q_heads, k_heads, head_dim, element_size)


def make_inputs(batch: int, seq: int, heads: tuple[int, int, int], dtype: torch.dtype,
                device: torch.device) -> Tensors:
    """Fresh random normal q (batch, seq, q_heads, head_dim) and k (.., k_heads, ..) in
    ``dtype``, and the fp32 cos/sin table (seq, head_dim / 2) of Llama 3's theta."""
    from eurocore.ops import rope_cos_sin

    q_heads, k_heads, head_dim = heads
    q = torch.randn(batch, seq, q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seq, k_heads, head_dim, dtype=dtype, device=device)
    cos, sin = rope_cos_sin(seq, head_dim, theta=THETA, device=device)
    return q, k, cos, sin


def _setup(make_impl: Callable[[], Impl], variant: str, batch: int, seq: int,
           heads: tuple[int, int, int], dtype: torch.dtype, device: torch.device
           ) -> Callable[[], Callable[[], object]]:
    """The case's setup: the implementation, fresh inputs (:func:`make_inputs`) in its
    form, then the callable that runs ``variant``."""

    def setup() -> Callable[[], object]:
        impl = make_impl()
        q_in, k_in, *tables = impl.prepare(*make_inputs(batch, seq, heads, dtype, device))
        if variant == "fwd":
            return lambda: impl.forward(q_in, k_in, *tables)
        # Leaves in the implementation's layout; the output gradients get their strides.
        q_in = q_in.detach().requires_grad_(True)
        k_in = k_in.detach().requires_grad_(True)
        grads = (torch.randn_like(q_in), torch.randn_like(k_in))
        if variant == "bwd":
            outputs = impl.forward(q_in, k_in, *tables)
            return lambda: torch.autograd.grad(outputs, (q_in, k_in), grad_outputs=grads,
                                               retain_graph=True)
        if variant == "fwd+bwd":
            return lambda: torch.autograd.grad(impl.forward(q_in, k_in, *tables), (q_in, k_in),
                                               grad_outputs=grads)
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    return setup


def hf_tables(cos: torch.Tensor, sin: torch.Tensor, seq: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos/sin for positions 0 .. seq - 1: the rows gathered, duplicated to the full
    head dim and cast to the activations' dtype, shape (1, seq, head_dim)."""
    positions = torch.arange(seq, device=cos.device)
    rows_cos, rows_sin = cos[positions], sin[positions]
    full_cos = torch.cat((rows_cos, rows_cos), dim=-1).to(dtype)
    full_sin = torch.cat((rows_sin, rows_sin), dim=-1).to(dtype)
    return full_cos.unsqueeze(0), full_sin.unsqueeze(0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A typical user's rotary in plain PyTorch, HF's ``apply_rotary_pos_emb`` for bshd:
    q, k (batch, seq, heads, head_dim); cos, sin (1 or batch, seq, head_dim) from
    :func:`hf_tables`, in q's dtype (so the math runs in q's dtype)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _prepare_hf(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> Tensors:
    return (q, k, *hf_tables(cos, sin, q.shape[1], q.dtype))


def _eager() -> Impl:
    return Impl(_prepare_hf, eager_rotary)


def _compiled() -> Impl:
    """A fresh torch.compile'd :func:`eager_rotary`, made when its case runs.

    Dynamo caches compiled graphs per code object, up to a recompile limit (8): one compiled
    function shared across shapes and variants could silently fall back to eager. Each case
    therefore resets Dynamo and compiles once for its own shape (static shapes); the
    harness's first call compiles, outside the timing.
    """
    torch.compiler.reset()
    return Impl(_prepare_hf, torch.compile(eager_rotary, dynamic=False))


def _eurocore(backend: str) -> Callable[[], Impl]:
    """eurocore's rotary on one backend, chosen explicitly."""
    from eurocore.ops import apply_rotary

    def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, cos, sin, backend=backend)

    return harness.constant(Impl(lambda q, k, cos, sin: (q, k, cos, sin), forward))


def _liger() -> tuple[Callable[[], Impl] | None, str | None]:
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as err:  # not installed, or installed against another torch/triton
        return None, f"liger_kernel not importable ({type(err).__name__}: {err})"

    def prepare(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> Tensors:
        # (batch, heads, seq, head_dim) views of the bshd storage, as HF's attention has them
        return (q.transpose(1, 2), k.transpose(1, 2), *hf_tables(cos, sin, q.shape[1], q.dtype))

    def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return LigerRopeFunction.apply(q, k, cos, sin)

    return harness.constant(Impl(prepare, forward)), None


def _flash_attn() -> tuple[Callable[[], Impl] | None, str | None]:
    try:
        from flash_attn.layers.rotary import apply_rotary_emb
    except Exception as err:
        return None, f"flash_attn not importable ({type(err).__name__}: {err})"

    def prepare(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> Tensors:
        return q, k, cos.to(q.dtype), sin.to(q.dtype)  # it requires tables in q's dtype

    def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)  # one per call

    return harness.constant(Impl(prepare, forward)), None


def cases(device: torch.device | str, quick: bool) -> list[Case]:
    """The rotary cases for ``device``: every implementation, shape and variant.

    On a GPU: bf16, 32 query and 8 key heads of 128, tokens {4096, 16384, 65536} in
    sequences of 4096 (quick: 16384 only). On the CPU: float32 (CPU bf16 is not
    representative; the dtype field says float32), 8 query and 2 key heads of 128, tokens
    {256, 1024} in one sequence, no Triton-based implementation (no interpreter runs) and
    torch.compile only without ``quick``.

    Returns:
        Cases to run, plus skipped cases (``Case.skip`` set) naming what is left out and why.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype, dtype_name, note = harness.case_dtype(device)
    if gpu:
        heads, tokens_list = GPU_HEADS, GPU_QUICK_TOKENS if quick else GPU_TOKENS
    else:
        heads, tokens_list = CPU_HEADS, CPU_TOKENS

    from eurocore.ops.rotary import IMPLEMENTED

    impls, out = harness.implementations(
        "apply_rotary", OP, device, IMPLEMENTED, eurocore=_eurocore, eager=_eager,
        compiled=_compiled, third_party=[("liger", _liger), ("flash-attn", _flash_attn)],
        quick=quick, dtype_name=dtype_name)

    element_size = torch.empty((), dtype=dtype).element_size()
    q_heads, k_heads, head_dim = heads
    for variant in VARIANTS:
        for tokens in tokens_list:
            batch, seq = split_tokens(tokens)
            fwd = fwd_bytes(tokens, seq, q_heads, k_heads, head_dim, element_size)
            bwd = bwd_bytes(tokens, seq, q_heads, k_heads, head_dim, element_size)
            nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[variant]
            shape = {"batch": batch, "seq": seq, "q_heads": q_heads, "k_heads": k_heads,
                     "head_dim": head_dim}
            for name, make_impl in impls:
                out.append(Case(
                    op=OP, variant=variant, shape=shape, dtype=dtype_name, impl=name,
                    setup=_setup(make_impl, variant, batch, seq, heads, dtype, device),
                    bytes=nbytes, note=note,
                ))
    return out

