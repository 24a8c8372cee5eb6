"""The bad-input catalogue of the ops, modules and model (issue 13, "No silent wrong
results"): for each class of hole a new user found, several cases, each asserting the right
answer, or the exception type and the argument's name raised before anything was written.
Regression cases the fuzzer (test_fuzz.py) found live here too.

Classes: 1 index tensors with non-unit strides; 2 ids outside the vocabulary or the
positions; 3 one lse semantics on every backend; 4 in place on aliased memory; 8 late or
unclear errors of modules (and the cuda backend on empty heads); 9 bad packed-sequence
bounds where the checks are skipped (compiled graphs) stay inside the tensors; 10 the
design document lives in the repository. The run options (classes 5 to 8 of the command
line) are in test_run_options.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import eurocore.ops.attention as attention_op
import eurocore.ops.rotary as rotary_op
from eurocore.kernels import flash_attention as attention_kernels
from eurocore.model import LlamaModel, check_token_ids, preset, stage_chunks
from eurocore.nn import FlashAttention, LlamaRMSNorm, RMSNorm, RotaryEmbedding
from eurocore.ops import (
    apply_rotary,
    apply_rotary_reference,
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
    rms_norm,
    rope_cos_sin,
)
from eurocore.ops.backends import backend_status
from eurocore.parallel import (
    ColumnParallelLinear,
    ParallelGroups,
    ParallelRMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, train
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

ATTENTION_BACKENDS = [b for b in attention_op.IMPLEMENTED if backend_status(b).available]
ROTARY_BACKENDS = [b for b in rotary_op.IMPLEMENTED if backend_status(b).available]
# the interpreter's bf16 tl.dot is wrong (docs/design.md): fp16 on the CPU
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16


def _randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _strided(values: list[int], how: str, dtype=torch.int32) -> torch.Tensor:
    """``values`` as a non-contiguous index tensor: a column of a 2-D tensor, or every other
    element of a longer one (the junk between them is -7)."""
    flat = torch.tensor(values, dtype=dtype, device=DEVICE)
    pairs = torch.stack([flat, torch.full_like(flat, -7)], dim=1)
    strided = pairs[:, 0] if how == "column" else pairs.flatten()[::2]
    assert not strided.is_contiguous() and torch.equal(strided, flat)
    return strided


def _snapshot(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    return [(t.detach().clone(), t._version) for t in tensors]


def _assert_untouched(snapshot, *tensors: torch.Tensor) -> None:
    for (values, version), t in zip(snapshot, tensors, strict=True):
        assert t._version == version and torch.equal(t.detach(), values), "an input changed"


# -------------------------------------------------------------------------------------------
# 1. Index tensors with non-unit strides
# -------------------------------------------------------------------------------------------

CU_Q, CU_K = [0, 9, 9, 17], [0, 5, 13, 20]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("how", ["column", "every_other"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_varlen_attention_reads_strided_cu_seqlens(backend, how, dtype):
    """A cu_seqlens that is a column of a 2-D tensor gives the output and gradients of its
    contiguous copy (the Triton kernels read it as a row: wrong output, garbage backward)."""
    q = _randn(0, CU_Q[-1], 4, 16, dtype=HALF).requires_grad_()
    k, v = (_randn(s, CU_K[-1], 2, 16, dtype=HALF).requires_grad_() for s in (1, 2))
    dout = _randn(3, *q.shape, dtype=HALF)
    results = []
    for cu_q, cu_k in ((_strided(CU_Q, how, dtype), _strided(CU_K, how, dtype)),
                       (torch.tensor(CU_Q, dtype=dtype, device=DEVICE),
                        torch.tensor(CU_K, dtype=dtype, device=DEVICE))):
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 8, causal=True, backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, k, v), dout)])
    for name, strided, contiguous in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(strided, contiguous), f"{backend} {name}"


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
@pytest.mark.parametrize("which", ["cu_seqlens", "seqlen_offsets", "position_ids"])
def test_rotary_reads_strided_index_tensors(backend, which):
    """Every index tensor of apply_rotary, non-contiguous, rotates as its contiguous copy."""
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(32, 16))
    q, k = _randn(0, 13, 3, 16), _randn(1, 13, 1, 16)
    if which == "position_ids":
        ids = torch.randint(0, 32, (13,), generator=torch.Generator().manual_seed(4)).tolist()
        strided = {"position_ids": _strided(ids, "column", torch.int64)}
    else:
        strided = {"cu_seqlens": _strided([0, 4, 4, 13], "every_other")}
        if which == "seqlen_offsets":
            strided["seqlen_offsets"] = _strided([3, 0, 7], "column")
    contiguous = {name: t.contiguous() for name, t in strided.items()}
    got = apply_rotary(q, k, cos, sin, layout="thd", backend=backend, **strided)
    want = apply_rotary(q, k, cos, sin, layout="thd", backend=backend, **contiguous)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_model_takes_non_contiguous_position_ids():
    """Position ids that are a transposed view give the loss of their contiguous copy."""
    config = preset("tiny", max_seq_len=32)
    model = LlamaModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator()
                           .manual_seed(0))
    positions = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
    strided = positions.t().contiguous().t()
    assert not strided.is_contiguous()
    assert torch.equal(model(tokens, tokens, position_ids=strided),
                       model(tokens, tokens, position_ids=positions))


# -------------------------------------------------------------------------------------------
# 2. Ids outside the vocabulary (or the positions)
# -------------------------------------------------------------------------------------------

VOCAB, SEQ = preset("tiny").vocab_size, 12


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _poke(t: torch.Tensor, value: int, where=(1, 5)) -> torch.Tensor:
    t = t.clone()
    t[where] = value
    return t


BAD_IDS = {
    "token = vocab": (lambda b: b.update(tokens=_poke(b["tokens"], VOCAB)), "tokens"),
    "token far above": (lambda b: b.update(tokens=_poke(b["tokens"], 10**6)), "tokens"),
    "token negative": (lambda b: b.update(tokens=_poke(b["tokens"], -1)), "tokens"),
    "label = vocab": (lambda b: b.update(labels=_poke(b["labels"], VOCAB)), "labels"),
    "label -1": (lambda b: b.update(labels=_poke(b["labels"], -1)), "labels"),
    "label -101": (lambda b: b.update(labels=_poke(b["labels"], -101)), "labels"),
    "position = max_seq_len": (lambda b: b.update(
        position_ids=_poke(b["position_ids"], preset("tiny").max_seq_len, (0, 11))),
        "position_ids"),
    "position negative": (lambda b: b.update(position_ids=_poke(b["position_ids"], -3)),
                          "position_ids"),
}


@pytest.fixture(scope="module")
def tiny_model() -> LlamaModel:
    return LlamaModel(preset("tiny"))


@pytest.mark.parametrize("case", BAD_IDS)
def test_model_refuses_ids_outside_their_range(tiny_model, case):
    """A stray token (masked to a zero embedding before) or label (skipped by the loss) or
    position: a ValueError naming the tensor and the place, before the embedding runs."""
    change, arg = BAD_IDS[case]
    batch = {"tokens": _ids(0), "labels": _ids(1),
             "position_ids": torch.arange(SEQ).repeat(2, 1)}
    change(batch)
    reached = []
    hook = tiny_model.embedding.register_forward_pre_hook(lambda *_: reached.append(1))
    try:
        with pytest.raises(ValueError, match=rf"^{arg}: -?\d+ at index \[\d+, \d+\] is "
                                             rf"outside"):
            tiny_model(batch["tokens"], batch["labels"], position_ids=batch["position_ids"])
    finally:
        hook.remove()
    assert not reached, "the embedding ran"


def test_ignored_labels_are_fine(tiny_model):
    """-100 is the ignore index: accepted, and the loss is the mean over the other tokens."""
    tokens, labels = _ids(0), _ids(1)
    ignored = labels.clone()
    ignored[:, ::2] = -100
    loss = tiny_model(tokens, ignored)
    logits = tiny_model(tokens)[..., :VOCAB].transpose(0, 1).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ignored.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_check_token_ids_reads_the_device_once(monkeypatch):
    """One read of the reduced values for tokens, labels and positions together (not one
    synchronisation per tensor or per layer)."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    check_token_ids(preset("tiny"), _ids(0), _ids(1), torch.arange(SEQ).repeat(2, 1))
    assert len(reads) == 1


def test_trainer_checks_each_batch_in_the_data_path(monkeypatch):
    """A batch with a stray token stops the run with a ValueError naming tokens, before
    the step runs (the model's own check is off in the trainer: this is the one that works
    under torch.compile and CUDA graphs, on the CPU)."""
    import eurocore.train.trainer as trainer
    from eurocore.data.source import Batch
    from eurocore.data.synthetic import MarkovSource

    def bad_batch(self, batch, seq, step, **kwargs):
        good = original(self, batch, seq, step, **kwargs)
        return Batch(_poke(good.tokens, VOCAB + 3, (0, 0)), good.labels, good.position_ids)

    original = MarkovSource.batch
    steps = []
    monkeypatch.setattr(MarkovSource, "batch", bad_batch)
    monkeypatch.setattr(trainer, "run_schedule", lambda *a, **k: steps.append(1))
    process = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^tokens: 253 at index \[0, 0\]"):
        train(TrainConfig(steps=2, batch_size=2, seq_len=16), process, log=lambda _: None)
    assert not steps


# -------------------------------------------------------------------------------------------
# 3. One lse semantics: differentiable on every backend
# -------------------------------------------------------------------------------------------

LSE_CASES = {
    "causal-gqa": dict(shape=(2, 9, 12, 4, 2, 16), causal=True),
    "window-softcap": dict(shape=(1, 17, 17, 2, 1, 32), window_size=(3, 1), softcap=5.0),
    "unseen-rows": dict(shape=(1, 12, 5, 2, 2, 16), causal=True),  # 7 rows see no key
    "varlen": dict(cu_q=[0, 4, 4, 11], cu_k=[0, 6, 7, 18], heads=2, kv_heads=1, causal=True),
}


def _lse_run(fn, q, k, v, weight):
    """Gradients of Σ lse · weight over the rows that see a key (lse only in the loss)."""
    _, lse = fn(q, k, v)
    loss = (lse.masked_fill(torch.isinf(lse), 0.0) * weight.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)  # lse ignores v
    return [lse, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v),
                                                                           strict=True))]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("case", LSE_CASES)
def test_lse_gradient_matches_the_reference(backend, case):
    """lse requires grad on every backend and its gradient is the reference's (the Triton
    backend returned zeros)."""
    options = dict(LSE_CASES[case])
    if "cu_q" in options:
        cu_q, cu_k = (torch.tensor(options.pop(n), dtype=torch.int32, device=DEVICE)
                      for n in ("cu_q", "cu_k"))
        heads, kv_heads = options.pop("heads"), options.pop("kv_heads")
        q_shape, k_shape = (int(cu_q[-1]), heads, 16), (int(cu_k[-1]), kv_heads, 16)
        lse_shape = (heads, int(cu_q[-1]))
        max_q, max_k = (int((c[1:] - c[:-1]).max()) for c in (cu_q, cu_k))

        def op(q, k, v):
            return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                          backend=backend, **options)

        def reference(q, k, v, upcast=True):
            return attention_varlen_reference(q, k, v, cu_q, cu_k, upcast=upcast, **options)
    else:
        batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = options.pop("shape")
        q_shape, k_shape = (batch, seqlen_q, heads, head_dim), (batch, seqlen_k, kv_heads,
                                                                head_dim)
        lse_shape = (batch, heads, seqlen_q)

        def op(q, k, v):
            return flash_attention(q, k, v, return_lse=True, backend=backend, **options)

        def reference(q, k, v, upcast=True):
            return attention_reference(q, k, v, upcast=upcast, **options)
    q, k, v = (_randn(s, *shape, dtype=HALF).requires_grad_()
               for s, shape in ((0, q_shape), (1, k_shape), (2, k_shape)))
    weight = _randn(3, *lse_shape)
    actual = _lse_run(op, q, k, v, weight)
    assert actual[0].requires_grad
    same = _lse_run(lambda *t: reference(*t, upcast=False), q, k, v, weight)
    ref64 = _lse_run(reference, *(t.detach().double().requires_grad_() for t in (q, k, v)),
                     weight)
    live = ~torch.isinf(ref64[0])
    assert torch.equal(torch.isinf(actual[0]), ~live)
    for name, a, s, r in zip(("lse", "dq", "dk", "dv"), [actual[0][live], *actual[1:]],
                             [same[0][live], *same[1:]], [ref64[0][live], *ref64[1:]],
                             strict=True):
        assert_close_to_reference(a, r, s, name=f"{backend} {case} {name}", atol=1e-5)
    assert actual[1].abs().max() > 0, "no gradient reached q through lse"


# -------------------------------------------------------------------------------------------
# 4. In place on aliased or overlapping memory
# -------------------------------------------------------------------------------------------

def _tables(n=16, rotary_dim=16):
    return tuple(t.to(DEVICE) for t in rope_cos_sin(n, rotary_dim))


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
@pytest.mark.parametrize("case", ["k is q", "k overlaps q", "k a shifted view"])
def test_in_place_rotary_refuses_shared_elements(backend, case):
    """q and k sharing an element would rotate it twice on the kernel backends (once on
    torch): refused on every backend, naming k, and nothing is written."""
    buffer = _randn(0, 1, 4, 4, 16)
    q, k = {"k is q": (buffer, buffer),
            "k overlaps q": (buffer[:, :, :3], buffer[:, :, 2:]),
            "k a shifted view": (buffer[:, :3], buffer[:, 1:])}[case]
    before = _snapshot(buffer)
    with pytest.raises(ValueError, match=r"^k: shares memory with q"):
        apply_rotary(q, k, *_tables(), inplace=True, backend=backend)
    _assert_untouched(before, buffer)


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
@pytest.mark.parametrize("case", ["expanded seq", "expanded heads", "as_strided fold"])
def test_in_place_rotary_refuses_self_overlapping_tensors(backend, case):
    """A tensor whose elements share memory cannot be written in place (the kernels wrote
    garbage where torch raised): a ValueError naming q, and nothing is written."""
    base = _randn(0, 1, 1, 2, 16)
    q = {"expanded seq": base.expand(1, 4, 2, 16),
         "expanded heads": base[:, :, :1].expand(1, 1, 3, 16),
         "as_strided fold": base.flatten().as_strided((1, 2, 2, 16), (32, 8, 8, 1))}[case]
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"^q: some of its elements share memory"):
        apply_rotary(q, None, *_tables(), inplace=True, backend=backend)
    _assert_untouched(before, base)


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
@pytest.mark.parametrize("split", ["unbind", "gqa", "mqa"])
def test_in_place_rotary_of_views_of_one_buffer(backend, split):
    """q and k cut from one fused projection interleave in memory without sharing an
    element: accepted, and rotated as the reference rotates copies; v is untouched."""
    heads = {"unbind": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}[split]
    if split == "unbind":
        fused = _randn(0, 2, 5, 3, 4, 16)
        q, k, v = fused.unbind(2)
    else:
        fused = _randn(0, 2, 5, (heads[0] + 2 * heads[1]) * 16)
        q = fused[..., : heads[0] * 16].unflatten(-1, (heads[0], 16))
        k = fused[..., heads[0] * 16:(heads[0] + heads[1]) * 16].unflatten(-1, (heads[1], 16))
        v = fused[..., (heads[0] + heads[1]) * 16:]
    v_before = v.clone()
    want = apply_rotary_reference(q.clone(), k.clone(), *_tables())
    got = apply_rotary(q, k, *_tables(), inplace=True, backend=backend)
    assert got[0] is q and got[1] is k
    torch.testing.assert_close(q, want[0])
    torch.testing.assert_close(k, want[1])
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
@pytest.mark.parametrize("heads", [(3, 0), (0, 2)], ids=["no-kv-heads", "no-q-heads"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_rotary_with_empty_heads(backend, heads, inplace):
    """0 heads of q or of k: the other rotates as on torch (the cuda backend reported an
    internal message for 0 kv heads)."""
    q, k = _randn(0, 2, 5, heads[0], 16), _randn(1, 2, 5, heads[1], 16)
    want = apply_rotary_reference(q, k, *_tables())
    got = apply_rotary(q.clone(), k.clone(), *_tables(), inplace=inplace, backend=backend)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# -------------------------------------------------------------------------------------------
# 8. Late or unclear errors: modules check their arguments when built
# -------------------------------------------------------------------------------------------

MODULE_ARGUMENTS = [
    (FlashAttention, dict(window_size=5), TypeError, "window_size"),
    (FlashAttention, dict(window_size=(2, -3)), ValueError, "window_size"),
    (FlashAttention, dict(window_size=(1.5, 0)), TypeError, "window_size"),
    (FlashAttention, dict(softcap=-1.0), ValueError, "softcap"),
    (FlashAttention, dict(causal=1), TypeError, "causal"),
    (FlashAttention, dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (FlashAttention, dict(backend="cudnn"), ValueError, "backend"),
    (lambda **kw: RMSNorm(0, **kw), {}, ValueError, "normalized_shape"),
    (lambda **kw: RMSNorm("8", **kw), {}, TypeError, "normalized_shape"),
    (lambda **kw: RMSNorm((8, 0), **kw), {}, ValueError, "normalized_shape"),
    (lambda **kw: RMSNorm(8, **kw), dict(eps=-1e-6), ValueError, "eps"),
    (lambda **kw: RMSNorm(8, **kw), dict(eps=math.nan), ValueError, "eps"),
    (lambda **kw: RMSNorm(8, **kw), dict(elementwise_affine=1), TypeError,
     "elementwise_affine"),
    (lambda **kw: RMSNorm(8, **kw), dict(backend="tpu"), ValueError, "backend"),
    (lambda **kw: LlamaRMSNorm(8, **kw), dict(eps=math.inf), ValueError, "eps"),
    (lambda **kw: RotaryEmbedding(8, **kw), dict(backend=3), ValueError, "backend"),
]


@pytest.mark.parametrize("build, kwargs, exc, arg", MODULE_ARGUMENTS,
                         ids=lambda x: x if isinstance(x, str) else None)
def test_module_checks_arguments_when_built(build, kwargs, exc, arg):
    """The error comes at construction, naming the argument (FlashAttention(window_size=5)
    failed at the first forward with "'int' object is not iterable")."""
    with pytest.raises(exc, match=rf"^{arg}\b"):
        build(**kwargs)


HF_CONFIG = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                 rope_theta=10000.0)


@pytest.mark.parametrize("missing", ["hidden_size", "num_attention_heads",
                                     "max_position_embeddings"])
def test_from_hf_config_names_a_missing_field(missing):
    """A config without a field the module needs: a ValueError naming the field (it was a
    bare AttributeError)."""
    config = types.SimpleNamespace(**{k: v for k, v in HF_CONFIG.items() if k != missing})
    with pytest.raises(ValueError, match=rf"^config: has no '{missing}'"):
        RotaryEmbedding.from_hf_config(config)


@pytest.mark.parametrize("factor", [0.0, 1.5, math.nan])
def test_from_hf_config_checks_partial_rotary_factor(factor):
    config = types.SimpleNamespace(**HF_CONFIG, partial_rotary_factor=factor)
    with pytest.raises(ValueError, match=r"^config.partial_rotary_factor: "):
        RotaryEmbedding.from_hf_config(config)


def test_from_hf_config_without_head_dim_field_works():
    rope = RotaryEmbedding.from_hf_config(types.SimpleNamespace(**HF_CONFIG))
    assert rope.rotary_dim == 16 and rope.max_position_embeddings == 32


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton", "cuda")
                                     if backend_status(b).available])
def test_rms_norm_zero_centered_weight_must_be_a_bool(backend):
    """A fuzzer find: the torch backend took zero_centered_weight=1 as True."""
    x, weight = _randn(0, 3, 8), _randn(1, 8)
    with pytest.raises(TypeError, match=r"^zero_centered_weight: expected a bool"):
        rms_norm(x, weight, zero_centered_weight=1, backend=backend)


@pytest.mark.parametrize("backend", ROTARY_BACKENDS)
def test_in_place_rotary_sees_overlap_across_storages(backend):
    """Two tensors over the same memory need not share a storage object (torch.from_numpy
    of two overlapping slices): the overlap is found by address (a review find)."""
    numpy = pytest.importorskip("numpy")
    if DEVICE.type != "cpu":
        pytest.skip("numpy arrays live on the CPU")
    array = numpy.random.RandomState(0).randn(96).astype(numpy.float32)
    q = torch.from_numpy(array[:64]).view(1, 4, 2, 8)
    k = torch.from_numpy(array[32:]).view(1, 4, 2, 8)
    before = array.copy()
    with pytest.raises(ValueError, match=r"^k: shares memory with q"):
        apply_rotary(q, k, *_tables(8, 8), inplace=True, backend=backend)
    assert (array == before).all()


PARALLEL_ARGUMENTS = [
    (lambda: ParallelRMSNorm(8, eps=-1.0), ValueError, "eps"),
    (lambda: ParallelRMSNorm(0), ValueError, "hidden_size"),
    (lambda: ColumnParallelLinear(4, -1), ValueError, "out_features"),
    (lambda: ColumnParallelLinear(0, 5), ValueError, "in_features"),
    (lambda: RowParallelLinear(4, 0), ValueError, "out_features"),
    (lambda: VocabParallelEmbedding(10, -4), ValueError, "embedding_dim"),
    (lambda: LlamaModel(preset("tiny"), check_ids=1), TypeError, "check_ids"),
    (lambda: LlamaModel(preset("tiny"), sequence_parallel="x"), TypeError,
     "sequence_parallel"),
    (lambda: stage_chunks(preset("tiny"), ParallelGroups.single(), num_chunks=0), ValueError,
     "num_chunks"),
]


@pytest.mark.parametrize("build, exc, arg", PARALLEL_ARGUMENTS,
                         ids=[arg for _, _, arg in PARALLEL_ARGUMENTS])
def test_parallel_layers_and_model_check_arguments_when_built(build, exc, arg):
    """The parallel layers and the model refuse impossible sizes and flags when built (a
    review find: accepted, or a torch RuntimeError deep inside, or a ZeroDivisionError)."""
    with pytest.raises(exc, match=rf"^{arg}: "):
        build()


MODEL_FIELDS = [
    ({"init_std": math.nan}, ValueError, "init_std"),  # a NaN loss, silently
    ({"init_std": -0.02}, ValueError, "init_std"),
    ({"tie_embeddings": "no"}, TypeError, "tie_embeddings"),  # truthy: tied, silently
    ({"norm_eps": -1.0}, ValueError, "norm_eps"),
    ({"rope_theta": -1.0}, ValueError, "rope_theta"),
    ({"seed": -5}, ValueError, "seed"),
    ({"rope_scaling": {"rope_type": "bogus"}}, ValueError, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear"}}, ValueError, "rope_scaling"),
]


@pytest.mark.parametrize("fields, exc, arg", MODEL_FIELDS,
                         ids=[arg for _, _, arg in MODEL_FIELDS])
def test_model_config_checks_every_field(fields, exc, arg):
    with pytest.raises(exc, match=rf"^{arg}: "):
        preset("tiny", **fields)


@pytest.mark.parametrize("arg", ["tokens", "labels", "position_ids"])
def test_model_refuses_float_ids(tiny_model, arg):
    """Float ids were truncated (position ids) or crashed deep in torch (tokens, labels)."""
    batch = {"tokens": _ids(0), "labels": _ids(1),
             "position_ids": torch.arange(SEQ).repeat(2, 1)}
    batch[arg] = batch[arg].float() + 0.5
    with pytest.raises(TypeError, match=rf"^{arg}: expected int32 or int64"):
        tiny_model(batch["tokens"], batch["labels"], position_ids=batch["position_ids"])


def test_model_takes_int32_ids(tiny_model):
    tokens, labels = _ids(0), _ids(1)
    torch.testing.assert_close(tiny_model(tokens.int(), labels.int()),
                               tiny_model(tokens, labels))


# -------------------------------------------------------------------------------------------
# 10. The project carries its own design document
# -------------------------------------------------------------------------------------------

def test_readme_links_the_design_document():
    """README links docs/design.md, which exists; nothing points at a file outside the
    repository (the README sent readers to ../shared/DESIGN.md)."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    assert "(docs/design.md)" in readme and (root / "docs" / "design.md").is_file()
    design = (root / "docs" / "design.md").read_text()
    for section in ("## Layers", "## The kernel contract", "## Bad input", "## Testing"):
        assert section in design, section
    assert "../shared" not in readme and "../shared" not in design


# -------------------------------------------------------------------------------------------
# 9. Bad packed-sequence bounds where the checks are skipped stay inside the tensors
# -------------------------------------------------------------------------------------------

# Bounds past the end, decreasing, negative: what a compiled graph may be handed.
BAD_CU = {"past-the-end": [0, 5, 40, 90], "decreasing": [0, 12, 3, 13], "negative": [-9, 4, 8,
                                                                                    13]}
PAD = 64


def _inside(shape, dtype, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a tensor of ``shape`` with PAD rows of ``fill`` before and after it in
    one buffer, so a read outside the view meets ``fill`` and a write outside it changes
    the padding."""
    buffer = torch.full((shape[0] + 2 * PAD, *shape[1:]), fill, dtype=dtype, device=DEVICE)
    return buffer, buffer[PAD:PAD + shape[0]]


@pytest.mark.parametrize("case", BAD_CU)
def test_attention_kernels_stay_inside_their_tensors(case):
    """Forward and backward launched with bad cu_seqlens and generous max_seqlen (what a
    graph without checks passes on): no write lands outside the outputs and no read outside
    q, k, v (their surroundings are NaN; every value written is finite or -inf)."""
    cu = torch.tensor(BAD_CU[case], dtype=torch.int32, device=DEVICE)
    total, heads, head_dim = 13, 2, 16
    shape = (total, heads, head_dim)
    views = {}
    for name, seed in (("q", 0), ("k", 1), ("v", 2), ("do", 3)):
        buffer, view = _inside(shape, torch.float32, math.nan)
        view.copy_(_randn(seed, *shape))
        views[name] = view[None]
    outputs = {}
    for name in ("out", "dq", "dk", "dv"):
        outputs[name] = _inside(shape, torch.float32, 12345.0)
    lse_buffer = torch.full((heads, total + 2 * PAD), 12345.0, device=DEVICE)
    lse = lse_buffer[:, PAD:PAD + total]
    out = outputs["out"][1].zero_()[None]
    attention_kernels.flash_attn_fwd(views["q"], views["k"], views["v"], out, lse, cu, cu, 100,
                                     0.25, (-1, 0), 0.0)
    grads = [outputs[n][1].zero_()[None] for n in ("dq", "dk", "dv")]
    attention_kernels.flash_attn_bwd(views["do"], views["q"], views["k"], views["v"], out,
                                     lse.contiguous(), *grads, cu, cu, 100, 100, 0.25, (-1, 0),
                                     0.0)
    for name, (buffer, _) in outputs.items():
        assert (buffer[:PAD] == 12345.0).all() and (buffer[-PAD:] == 12345.0).all(), (
            f"{name}: written outside the tensor")
        assert torch.isfinite(buffer[PAD:-PAD]).all(), f"{name}: read outside q, k, v"
    assert (lse_buffer[:, :PAD] == 12345.0).all() and (lse_buffer[:, -PAD:] == 12345.0).all()
    assert not lse.isnan().any()


@pytest.mark.parametrize("backend", [b for b in ROTARY_BACKENDS if b != "torch"])
@pytest.mark.parametrize("case", BAD_CU)
def test_rotary_kernels_stay_inside_their_tensors(monkeypatch, backend, case):
    """apply_rotary with its value checks skipped (as inside a compiled graph) and bad
    cu_seqlens: in place into a view of a padded buffer, the padding is untouched; tokens
    whose position falls outside the table come out NaN, as documented."""
    monkeypatch.setattr(rotary_op, "reads_allowed", lambda: False)
    buffer, q = _inside((13, 2, 16), torch.float32, 12345.0)
    q.copy_(_randn(0, 13, 2, 16))
    cu = torch.tensor(BAD_CU[case], dtype=torch.int32, device=DEVICE)
    apply_rotary(q, None, *_tables(), layout="thd", cu_seqlens=cu, inplace=True,
                 backend=backend)
    assert (buffer[:PAD] == 12345.0).all() and (buffer[-PAD:] == 12345.0).all()


@pytest.mark.slow
@pytest.mark.skipif(not ATTENTION_BACKENDS[1:], reason="no kernel backend for attention")
def test_compiled_varlen_attention_with_bad_bounds_finishes():
    """Inside torch.compile the cu_seqlens checks are skipped; bounds past the end used to
    corrupt memory (the process aborted with a double free). In a child process, so a crash
    fails this test instead of the run."""
    code = """
import os, torch
os.environ.setdefault("TRITON_INTERPRET", "1")
from eurocore.ops import flash_attention_varlen
q = torch.randn(13, 2, 16, requires_grad=True)
cu = torch.tensor([0, 5, 40, 90], dtype=torch.int32)
fn = torch.compile(lambda q, cu: flash_attention_varlen(q, q, q, cu, cu, 100, 100,
                   causal=True, backend="triton"), fullgraph=True)
for _ in range(3):
    out = fn(q, cu)
    out.sum().backward()
print("finished", bool(torch.isfinite(out).all()))
"""
    env = {"TRITON_INTERPRET": "1"} if DEVICE.type == "cpu" else {}
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished True" in result.stdout
