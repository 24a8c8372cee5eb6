"""Launch plans (eurocore.kernels.launch): a Launch runs as a launcher would, and a plan over
TensorSpecs is, to Triton's JIT, the plan over the tensors they stand for. So the compile
check, which plans with TensorSpecs, compiles what the launchers launch.
"""

import pytest
import torch

from eurocore.kernels import compile_engine as engine
from eurocore.kernels import flash_attention, rms_norm, rotary, swiglu
from eurocore.kernels.launch import Launch, TensorSpec


def _real(arg):
    """A CPU tensor of a TensorSpec's shape, dtype, strides and element offset into a fresh
    (16-byte aligned) allocation; any other argument (tuples of them too) as it is."""
    if isinstance(arg, tuple):
        return tuple(map(_real, arg))
    if not isinstance(arg, TensorSpec):
        return arg
    strides = arg.stride()
    extent = 1 + sum((n - 1) * s for n, s in zip(arg.shape, strides, strict=True))
    size = arg.offset + (extent if all(arg.shape) else 0)
    return torch.zeros(size, dtype=arg.dtype).as_strided(arg.shape, strides, arg.offset)


def _rms_norm_calls(spec):
    """With and without a residual and a weight, mixed dtypes, zero-centred, a misaligned x,
    one row, n = 1, fewer backward programs than rows."""
    for rows, n, x, r, w, zc, offset, programs in (
            (5, 48, "bf16", "bf16", "bf16", False, 0, 5), (3, 37, "fp32", None, None, False, 0, 2),
            (4, 40, "bf16", "fp32", "fp32", True, 0, 4), (2, 37, "fp16", None, "fp16", False, 1, 2),
            (1, 33, "bf16", "bf16", None, False, 0, 1), (6, 1, "bf16", None, "bf16", False, 0, 4)):
        hd = spec((1,), x).dtype if r is None else torch.promote_types(spec((1,), x).dtype,
                                                                         spec((1,), r).dtype)
        xs, weight = spec((rows, n), x, offset=offset), spec((n,), w) if w else None
        residual, h = (spec((rows, n), r), spec((rows, n), hd)) if r else (None, None)
        rstd = spec((rows,), "fp32")
        name = f"rows={rows} n={n} x:{x} r:{r} w:{w} zc={zc} offset={offset}"
        yield (f"rms fwd {name}", rms_norm.rms_norm_fwd_plan,
               (xs, weight, residual, 1e-6, zc, spec((rows, n), hd), h, rstd), {})
        dr = spec((rows, n), r) if r and r != x else None
        yield (f"rms bwd {name}", rms_norm.rms_norm_bwd_plan,
               (spec((rows, n), hd), spec((rows, n), hd) if r else None, h or xs, weight, rstd,
                zc, spec((rows, n), x), dr, spec((programs, n), "fp32"), programs), {})


def _swiglu_calls(spec):
    """Contiguous, the halves of a fused projection, a misaligned gate, an expanded dy."""
    for rows, n, dtype, fused, gate_offset, dy_strides in (
            (3, 48, "bf16", False, 0, None), (5, 37, "fp16", True, 0, None),
            (2, 48, "fp32", True, 0, None), (4, 48, "bf16", False, 1, (0, 1)),
            (1, 1, "bf16", False, 0, None)):
        strides = (2 * n, 1) if fused else None
        gate = spec((rows, n), dtype, strides, offset=gate_offset)
        up = spec((rows, n), dtype, strides, offset=gate_offset + n if fused else 0)
        out = [spec((rows, n), dtype) for _ in range(3)]
        name = f"rows={rows} n={n} {dtype} fused={fused} gate_offset={gate_offset}"
        yield f"swiglu fwd {name}", swiglu.swiglu_fwd_plan, (gate, up, out[0]), {}
        yield (f"swiglu bwd {name}", swiglu.swiglu_bwd_plan,
               (spec((rows, n), dtype, dy_strides), gate, up, out[1], out[2]), {})


def _rotary_calls(spec):
    """q and k or q alone, in place or not, a partial rotary, positions none, contiguous,
    expanded, transposed or (1, tokens), a misaligned q, one token per sequence."""
    for outer, inner, batch_first, heads, hd, half, dtype, table, pos, in_place, q_offset in (
            (2, 5, True, (3, 2), 16, 8, "bf16", "fp32", None, False, 0),
            (2, 5, True, (3, 0), 24, 4, "fp16", "fp16", ((2, 5), (5, 1)), False, 1),
            (5, 2, False, (4, 1), 20, 6, "fp32", "bf16", ((5, 2), (1, 0)), True, 0),
            (5, 2, False, (4, 1), 20, 6, "fp32", "bf16", None, False, 0),
            (1, 9, True, (2, 2), 16, 8, "bf16", "fp32", ((1, 9), (9, 1)), False, 0),
            (3, 1, True, (2, 1), 16, 4, "bf16", "fp32", ((3, 1), (1, 1)), True, 3)):
        q = spec((outer, inner, heads[0], hd), dtype, offset=q_offset)
        k = spec((outer, inner, heads[1], hd), dtype) if heads[1] else None
        out = (q, k) if in_place else (spec(q.shape, dtype), k and spec(k.shape, dtype))
        positions = spec(pos[0], "i64", pos[1]) if pos else None
        for conjugate in (False, True):
            yield (f"rotary {outer}x{inner} heads={heads} hd={hd}/{2 * half} {dtype} pos={pos} "
                   f"in_place={in_place} q_offset={q_offset} conjugate={conjugate}",
                   rotary.rotary_plan, (q, k, *out, spec((11, half), table),
                                        spec((11, half), table), positions),
                   dict(batch_first=batch_first, interleaved=conjugate,  # both, in turn
                        conjugate=conjugate, in_place=in_place))


def _attention_calls(spec):
    """Fixed-length and packed, GQA, head_dim 24, fp32, a window, a softcap, each vendor."""
    for batch, sq, sk, heads, hd, dtype, cu, window, softcap, vendor in (
            (2, 5, 5, (4, 4), 16, "bf16", None, (-1, -1), 0.0, "nvidia"),
            (2, 7, 9, (4, 2), 24, "fp16", None, (-1, 0), 0.0, "amd"),
            (1, 11, 13, (2, 1), 16, "bf16", "i32", (3, 1), 5.0, "nvidia"),
            (1, 11, 11, (2, 2), 64, "fp32", "i64", (-1, -1), 0.0, "amd"),
            (3, 4, 4, (1, 1), 256, "bf16", None, (2, -1), 0.0, "interpreter")):
        q, out, do, dq = (spec((batch, sq, heads[0], hd), dtype) for _ in range(4))
        k, v, dk, dv = (spec((batch, sk, heads[1], hd), dtype) for _ in range(4))
        lse, delta = (spec((heads[0], sq) if cu else (batch, heads[0], sq), "fp32")
                      for _ in range(2))
        cu_q, cu_k = (spec((4,), cu), spec((4,), cu)) if cu else (None, None)
        tail = (hd ** -0.5, window, softcap, vendor)
        name = f"attention {batch}x{sq}/{sk} heads={heads} hd={hd} {dtype} cu={cu} {vendor}"
        yield (f"{name} fwd", flash_attention.attn_fwd_plan,
               (q, k, v, out, lse, cu_q, cu_k, sq, *tail), {})
        yield (f"{name} bwd", flash_attention.attn_bwd_plan,
               (do, q, k, v, out, lse, delta, dq, dk, dv, cu_q, cu_k, sq, sk, *tail), {})


_CALLS = [call for calls in (_rms_norm_calls, _swiglu_calls, _rotary_calls, _attention_calls)
          for call in calls(TensorSpec)]


@pytest.mark.parametrize("name,plan,args,kwargs", [pytest.param(*c, id=c[0]) for c in _CALLS])
def test_plan_over_tensor_specs_is_the_plan_over_tensors(name, plan, args, kwargs):
    """Each Launch of a plan over real CPU tensors and over TensorSpecs of the same shapes,
    strides and offsets is the same launch to the JIT: grid, signature, constexprs,
    divisibility and options. The stand-in cannot drift from the tensors it stands for."""
    from_specs, from_tensors = plan(*args, **kwargs), plan(*map(_real, args), **kwargs)
    if isinstance(from_specs, Launch):
        from_specs, from_tensors = (from_specs,), (from_tensors,)
    assert len(from_specs) == len(from_tensors)
    for a, b in zip(from_specs, from_tensors, strict=True):
        assert a.grid == b.grid
        a, b = engine.aot_case(a, name), engine.aot_case(b, name)
        assert (a.kernel, a.signature, a.constexprs, a.divisible, a.num_warps, a.num_stages,
                a.options) == (b.kernel, b.signature, b.constexprs, b.divisible, b.num_warps,
                               b.num_stages, b.options)


@pytest.mark.parametrize("shape,dtype,strides,offset", [
    ((3, 5), "bf16", None, 0), ((3, 5), "fp32", (10, 1), 5), ((4, 1), "fp16", (0, 1), 1),
    ((2, 3, 4), "i64", None, 2), ((0, 7), "bf16", None, 0), ((8,), "fp32", None, 4)])
def test_tensor_spec_answers_as_the_tensor_does(shape, dtype, strides, offset):
    spec = TensorSpec(shape, dtype, strides, offset)
    tensor = _real(spec)
    assert (spec.shape, spec.dtype, spec.stride(), spec.is_contiguous()) == (
        tensor.shape, tensor.dtype, tensor.stride(), tensor.is_contiguous())
    assert [spec.stride(i) for i in range(len(spec.shape))] == list(tensor.stride())
    assert (spec.data_ptr() % 16 == 0) == (tensor.data_ptr() % 16 == 0)
    with pytest.raises(AttributeError):
        spec.device  # noqa: B018  (only what plans read: a plan reading more fails here)


def test_launch_runs_its_kernel_unless_the_grid_is_empty():
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    Launch(Kernel(), (3, 2), (1, 2.0), {"BLOCK": 8}, {"num_warps": 4}).run()
    assert launches == [((3, 2), (1, 2.0), {"BLOCK": 8, "num_warps": 4})]
    Launch(Kernel(), (0,), (1,), {}, {}).run()
    Launch(Kernel(), (3, 0), (1,), {}, {}).run()
    assert len(launches) == 1


@pytest.mark.parametrize("seqs,heads,max_seqlen_q", [(0, 4, 5), (2, 0, 5), (2, 4, 0)])
def test_attention_plans_launch_nothing_without_work(seqs, heads, max_seqlen_q):
    """No sequences, no heads or no queries: the forward's grid is empty; the backward's dk/dv
    grid is empty exactly when no key has a gradient to write (the launcher zeroes them)."""
    spec = TensorSpec
    q = spec((seqs, 5, heads, 16), "bf16")
    k = spec((seqs, 5, heads, 16), "bf16")
    lse = spec((seqs, heads, 5), "fp32")
    tail = (0.25, (-1, -1), 0.0, "nvidia")
    assert 0 in flash_attention.attn_fwd_plan(q, k, k, q, lse, None, None, max_seqlen_q,
                                              *tail).grid
    bwd = flash_attention.attn_bwd_plan(q, q, k, k, q, lse, lse, q, k, k, None, None,
                                        max_seqlen_q, 5, *tail)
    assert (0 in bwd.dkdv.grid) == (seqs * heads == 0)


def test_launcher_runs_its_plan_with_the_plans_signature(monkeypatch):
    """A launcher made by ``launcher`` takes the plan's arguments (one signature, written
    once) and runs the Launch the plan makes of them."""
    import inspect

    from eurocore.kernels.launch import launcher

    ran = []
    monkeypatch.setattr(Launch, "run", lambda launch: ran.append(launch))
    specs = [TensorSpec((3, 48), "bf16") for _ in range(3)]
    swiglu.swiglu_fwd(*specs)
    assert ran == [swiglu.swiglu_fwd_plan(*specs)]
    assert swiglu.swiglu_fwd.__name__ == "swiglu_fwd"
    signature = inspect.signature(rotary.rotary)
    assert signature.parameters == inspect.signature(rotary.rotary_plan).parameters
    assert signature.return_annotation is None
    with pytest.raises(TypeError):
        launcher(swiglu.swiglu_fwd_plan, "f")(*specs[:2])
