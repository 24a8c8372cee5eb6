"""The eager fast path (``eurocore.ops.dispatch``) against the custom-op path.

Every kernel op gives bitwise the same outputs and gradients on both paths; the fast path is
taken in plain eager mode (no ``eurocore::`` op reaches the dispatcher, as the profiler and a
spy on the custom ops see), and not under torch.compile, a ``TorchDispatchMode``, selective
checkpointing, functorch transforms or with tensor subclasses, which all must see the op.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eurocore.ops import (
    apply_rotary,
    dispatch,
    flash_attention,
    flash_attention_varlen,
    rms_norm,
    rope_cos_sin,
    swiglu,
)
from eurocore.ops.dispatch import eager_fast_path, eager_fast_path_allowed
from tests.conftest import DEVICE

BACKEND = "triton"
DTYPES = [torch.float32, torch.float16]  # bf16 tl.dot is wrong on the interpreter (#11584)
CUSTOM_OPS = list(dispatch.REGISTRY.values())


def _randn(gen, *shape, dtype, grad=True):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(grad)


def _rms_norm(gen, dtype):
    x, residual = _randn(gen, 3, 7, 33, dtype=dtype), _randn(gen, 3, 7, 33, dtype=dtype)
    weight = _randn(gen, 33, dtype=dtype)
    return (lambda x, w, r: rms_norm(x, w, 1e-5, residual=r, backend=BACKEND)), (x, weight,
                                                                                 residual)


def _rms_norm_zero_centered_no_residual(gen, dtype):
    x, weight = _randn(gen, 5, 17, dtype=dtype), _randn(gen, 17, dtype=dtype)
    return (lambda x, w: rms_norm(x, w, 1e-6, zero_centered_weight=True, backend=BACKEND),
            (x, weight))


def _swiglu(gen, dtype):
    # The halves of a fused gate/up projection: row-strided views, read in place.
    gate_up = _randn(gen, 5, 66, dtype=dtype)
    return (lambda gu: swiglu(*gu.chunk(2, -1), backend=BACKEND)), (gate_up,)


def _rotary(gen, dtype):
    q, k = _randn(gen, 2, 7, 3, 20, dtype=dtype), _randn(gen, 2, 7, 1, 20, dtype=dtype)
    cos, sin = rope_cos_sin(40, 12, device=DEVICE)  # 12 of 20 dims rotate
    offsets = torch.tensor([1, 30], device=DEVICE)
    return (lambda q, k: apply_rotary(q, k, cos, sin, seqlen_offsets=offsets,
                                      backend=BACKEND)), (q, k)


def _rotary_inplace(gen, dtype):
    q, k = _randn(gen, 7, 2, 3, 16, dtype=dtype), _randn(gen, 7, 2, 1, 16, dtype=dtype)
    cos, sin = rope_cos_sin(7, 16, device=DEVICE)

    def fn(q, k):  # in place on non-leaf tensors, as after a projection
        return apply_rotary(q * 1, k * 1, cos, sin, layout="sbhd", interleaved=True,
                            inplace=True, backend=BACKEND)

    return fn, (q, k)


def _attention(gen, dtype):
    q = _randn(gen, 1, 5, 2, 16, dtype=dtype)
    k, v = _randn(gen, 1, 7, 1, 16, dtype=dtype), _randn(gen, 1, 7, 1, 16, dtype=dtype)
    return (lambda q, k, v: flash_attention(q, k, v, causal=True, return_lse=True,
                                            backend=BACKEND)), (q, k, v)


def _attention_varlen(gen, dtype):
    q = _randn(gen, 9, 2, 16, dtype=dtype)
    k, v = _randn(gen, 9, 1, 16, dtype=dtype), _randn(gen, 9, 1, 16, dtype=dtype)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    return (lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 5, 5, window_size=(2, 1),
                                                   backend=BACKEND)), (q, k, v)


CASES = {
    "rms_norm": _rms_norm,
    "rms_norm_zero_centered": _rms_norm_zero_centered_no_residual,
    "swiglu": _swiglu,
    "rotary": _rotary,
    "rotary_inplace": _rotary_inplace,
    "flash_attention": _attention,
    "flash_attention_varlen": _attention_varlen,
}


def _case(name, dtype=torch.float32, seed=0):
    return CASES[name](torch.Generator().manual_seed(seed), dtype)


def _outputs(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def _run(fn, inputs, seed=1):
    """fn's outputs, then the inputs' gradients for fixed random output gradients."""
    outs = _outputs(fn(*inputs))
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, grads))


def _assert_bitwise_equal(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: tensor {i}"
        assert torch.equal(a, b), f"{what}: tensor {i} differs"


def test_every_kernel_op_is_registered_with_its_fast_path():
    assert {"eurocore::rms_norm_fwd", "eurocore::rms_norm_bwd", "eurocore::swiglu_fwd",
            "eurocore::swiglu_bwd", "eurocore::rotary", "eurocore::rotary_",
            "eurocore::flash_attn_fwd", "eurocore::flash_attn_bwd"} <= set(dispatch.REGISTRY)


@pytest.fixture
def dispatcher_calls(monkeypatch):
    """Counts, per op name, the calls of every eurocore custom op through torch.library."""
    calls = collections.Counter()
    for op in CUSTOM_OPS:
        def spy(*args, _op=op, _overload=op.overload):
            calls[_op.name] += 1
            return _overload(*args)

        monkeypatch.setattr(op, "overload", spy)
    return calls


def _profiled_ops(fn, inputs):
    """The ``eurocore::`` ops the dispatcher ran (RecordFunction events, which do not depend
    on eurocore's code), and the run's outputs and gradients."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = _run(fn, inputs)
    return {e.name for e in prof.events() if e.name.startswith("eurocore::")}, result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_equals_custom_op_path(name, dtype, dispatcher_calls):
    """Bitwise the same outputs and gradients; the fast path never reaches the dispatcher,
    the custom-op path always does, forward and backward."""
    fn, inputs = _case(name, dtype)
    with eager_fast_path(True):
        fast_ops, fast = _profiled_ops(fn, inputs)
    assert fast_ops == set() and not dispatcher_calls, (fast_ops, dispatcher_calls)
    with eager_fast_path(False):
        custom_ops, custom = _profiled_ops(fn, inputs)
    # The forward and the backward op of each (rotary: the same op both ways).
    assert len(custom_ops) >= (1 if name.startswith("rotary") else 2), custom_ops
    assert sum(dispatcher_calls.values()) >= 2, dispatcher_calls
    _assert_bitwise_equal(fast, custom, f"{name} {dtype}")


def test_fast_path_is_the_default_in_eager():
    assert eager_fast_path_allowed()
    fn, inputs = _case("rms_norm")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*inputs)
    assert not [e.name for e in prof.events() if e.name.startswith("eurocore::")]


def test_setting_turns_the_fast_path_off_and_back():
    previous = dispatch.set_eager_fast_path(False)
    try:
        assert not eager_fast_path_allowed()
        with eager_fast_path(True):
            assert eager_fast_path_allowed()
        assert not eager_fast_path_allowed()
    finally:
        dispatch.set_eager_fast_path(previous)
    with pytest.raises(TypeError, match="enabled"):
        dispatch.set_eager_fast_path(1)


def _recording_backend(graphs):
    """torch.compile backend: AOTAutograd with the graphs kept and run as they are (no
    Inductor: the same kernels as eager, so bitwise comparable)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _graph_ops(graphs):
    """The eurocore ops the graphs call, directly or through a higher-order op (a mutating
    op is functionalised into ``auto_functionalized(eurocore.rotary_.default, ...)``)."""
    ops = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function":
                ops.update(str(t) for t in (node.target, *node.args)
                           if isinstance(t, torch._ops.OpOverload)
                           and str(t).startswith("eurocore."))
    return ops


@pytest.mark.parametrize("name", ["rms_norm", "rotary_inplace", "flash_attention"])
def test_compile_takes_the_custom_op_path(name):
    """Under torch.compile(fullgraph=True) the forward and backward graphs hold the custom
    ops, and the compiled function's outputs and gradients equal eager's fast path."""
    fn, inputs = _case(name)
    with eager_fast_path(True):
        expected = _run(fn, inputs)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=_recording_backend(graphs), fullgraph=True)
    actual = _run(compiled, inputs)
    torch._dynamo.reset()
    ops = _graph_ops(graphs)
    forward_op = {"rms_norm": "eurocore.rms_norm_fwd", "rotary_inplace": "eurocore.rotary_",
                  "flash_attention": "eurocore.flash_attn_fwd"}[name]
    assert any(op.startswith(forward_op + ".") for op in ops), ops
    backward_op = {"rms_norm": "eurocore.rms_norm_bwd", "rotary_inplace": "eurocore.rotary",
                   "flash_attention": "eurocore.flash_attn_bwd"}[name]
    assert any(op.startswith(backward_op + ".") for op in ops), ops
    _assert_bitwise_equal(actual, expected, f"compiled {name}")


class _RecordingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["rms_norm", "swiglu", "rotary", "flash_attention"])
def test_dispatch_mode_sees_the_custom_ops(name):
    """Under a TorchDispatchMode (as FlopCounterMode, selective checkpointing) the ops reach
    the mode, forward and backward; results stay bitwise equal."""
    fn, inputs = _case(name)
    expected = _run(fn, inputs)
    mode = _RecordingMode()
    with mode:
        assert not eager_fast_path_allowed()
        actual = _run(fn, inputs)
    seen = {op for op in mode.ops if op.startswith("eurocore.")}
    assert len(seen) >= (1 if name == "rotary" else 2), seen
    _assert_bitwise_equal(actual, expected, f"{name} under a dispatch mode")


def _block(x, w, gate_up, q, k, cos, sin):
    """A small pre-norm block over every kernel op, for the checkpoint tests."""
    y, h = rms_norm(x, w, 1e-5, residual=x * 0.5, backend=BACKEND)
    q, k = apply_rotary(q * y.mean(), k, cos, sin, backend=BACKEND)
    out = flash_attention(q, k, k, causal=True, backend=BACKEND)
    return out.sum() * h.mean() + swiglu(*gate_up.chunk(2, -1), backend=BACKEND).sum()


def _block_inputs():
    gen = torch.Generator().manual_seed(3)
    x, w = _randn(gen, 4, 24, dtype=torch.float32), _randn(gen, 24, dtype=torch.float32)
    gate_up = _randn(gen, 3, 10, dtype=torch.float32)
    q, k = (_randn(gen, 1, 5, 2, 16, dtype=torch.float32),
            _randn(gen, 1, 5, 1, 16, dtype=torch.float32))
    cos, sin = rope_cos_sin(5, 16, device=DEVICE)
    return (x, w, gate_up, q, k), (cos, sin)


def _block_grads(wrap):
    leaves, tables = _block_inputs()
    loss = wrap(lambda *t: _block(*t, *tables), *leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def test_checkpoint_keeps_the_fast_path_and_its_results(dispatcher_calls):
    """Non-reentrant torch.utils.checkpoint works through saved-tensor hooks, not a dispatch
    mode: the fast path stays on, and loss and gradients equal the run without it."""
    from torch.utils.checkpoint import checkpoint

    expected = _block_grads(lambda f, *t: f(*t))
    actual = _block_grads(lambda f, *t: checkpoint(f, *t, use_reentrant=False))
    assert not dispatcher_calls
    _assert_bitwise_equal(actual, expected, "checkpointed block")


def test_selective_checkpoint_policy_sees_the_ops():
    """A selective-checkpoint policy (a TorchDispatchMode) is asked about each eurocore op:
    under it the custom-op path runs, with the same loss and gradients."""
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    asked = set()

    def policy(ctx, op, *args, **kwargs):
        asked.add(str(op))
        if str(op).startswith("eurocore."):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    expected = _block_grads(lambda f, *t: f(*t))
    actual = _block_grads(lambda f, *t: checkpoint(
        f, *t, use_reentrant=False,
        context_fn=lambda: create_selective_checkpoint_contexts(policy)))
    assert {"eurocore.rms_norm_fwd.default", "eurocore.rotary.default",
            "eurocore.flash_attn_fwd.default", "eurocore.swiglu_fwd.default"} <= asked, asked
    _assert_bitwise_equal(actual, expected, "selectively checkpointed block")


@pytest.mark.parametrize("name", ["rms_norm", "swiglu", "rotary", "flash_attention"])
def test_saved_tensors_hooks_see_the_same_tensors(name):
    """What autograd saves (what activation offloading and recomputation hooks act on) is
    the same on both paths: the same tensors, in the same order."""

    def saved(fast):
        packed = []

        def pack(t):
            packed.append(t.detach().clone())
            return t

        fn, inputs = _case(name)
        with eager_fast_path(fast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = _run(fn, inputs)
        return packed, result

    fast_saved, fast = saved(True)
    custom_saved, custom = saved(False)
    assert fast_saved
    _assert_bitwise_equal(fast_saved, custom_saved, f"{name}: saved tensors")
    _assert_bitwise_equal(fast, custom, f"{name}: results under hooks")


def test_inplace_bumps_versions_as_the_dispatcher_does():
    """In place, q and k's version counters move as far on both paths, so autograd still
    catches a tensor overwritten after it was saved."""

    def versions(fast):
        q = torch.randn(1, 4, 2, 16, device=DEVICE) * 1
        k = torch.randn(1, 4, 1, 16, device=DEVICE) * 1
        cos, sin = rope_cos_sin(4, 16, device=DEVICE)
        before = q._version, k._version
        with eager_fast_path(fast):
            apply_rotary(q, k, cos, sin, inplace=True, backend=BACKEND)
        return q._version - before[0], k._version - before[1]

    assert versions(True) == versions(False)
    assert versions(True) >= (1, 1)


def test_inference_mode_takes_the_fast_path(dispatcher_calls):
    fn, inputs = _case("rms_norm")
    with torch.inference_mode():
        fast = _outputs(fn(*inputs))
        assert not dispatcher_calls
        with eager_fast_path(False):
            custom = _outputs(fn(*inputs))
    assert dispatcher_calls["eurocore::rms_norm_fwd"] == 1
    _assert_bitwise_equal(fast, custom, "inference mode")


class _Subclass(torch.Tensor):
    """A tensor subclass with torch's default __torch_function__ (as a user's wrapper)."""


def test_tensor_subclass_takes_the_custom_op_path(dispatcher_calls):
    fn, (x, w, r) = _case("rms_norm")
    expected = _outputs(fn(x, w, r))
    sub = torch.Tensor._make_subclass(_Subclass, x.detach())
    actual = _outputs(fn(sub, w.detach(), r.detach()))
    assert dispatcher_calls["eurocore::rms_norm_fwd"] == 1
    _assert_bitwise_equal([t.as_subclass(torch.Tensor).detach() for t in actual],
                          [t.detach() for t in expected], "subclass")


class _RecordingFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_allowed_only_where_nothing_must_see_the_op():
    """The one decision, in each situation it covers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert eager_fast_path_allowed()
    with torch.device(DEVICE):  # torch.set_default_device's mode changes factories only
        assert eager_fast_path_allowed()
    with _RecordingFunctionMode():
        assert not eager_fast_path_allowed()
    with FakeTensorMode():
        assert not eager_fast_path_allowed()
    with _RecordingMode():
        assert not eager_fast_path_allowed()

    seen = []

    def probe(x):
        seen.append(eager_fast_path_allowed())
        return x * 2

    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.grad(lambda x: probe(x).sum())(torch.ones(3))
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, and still used
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(probe, torch.ones(2), check_trace=False)
    assert seen == [False, False, False]
