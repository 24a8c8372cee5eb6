"""The cuda backend's own concerns, beside the op tests that run it like every backend:
the GPU build rejects CPU tensors, the C++ launchers check their arguments before any
launch, the 16-byte and the scalar paths are both taken where they should be, and the
kernels' reductions hold for AMD's 64-wide wavefronts as well as NVIDIA's 32-wide warps.

Without a GPU the kernels run on the CPU emulator (eurocore._C_emulated), which conftest.py
selects; the GPU build eurocore._C is built wherever nvcc or hipcc was found (CI has nvcc).
"""

from __future__ import annotations

import os

import pytest
import torch

from eurocore.ops import apply_rotary, backends, cuda_launchers, rope_cos_sin
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference
from tests.ops.test_rms_norm import _compare as compare_rms_norm
from tests.ops.test_rotary import _compare as compare_rotary

emulated = pytest.mark.skipif(not backends.cuda_emulation_active() or torch.cuda.is_available(),
                              reason="checks the C++ kernels on the CPU emulator")


def _gpu_build():
    """eurocore._C; skipped where it is not built, except in CI, which builds it with nvcc."""
    try:
        from eurocore import _C
    except ImportError as err:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI must build eurocore._C (nvcc is installed)") from err
        pytest.skip(f"eurocore._C is not built ({err})")
    return _C


@pytest.fixture
def gpu_build(monkeypatch):
    """The cuda backend served by the GPU build, emulation off."""
    extension = _gpu_build()
    monkeypatch.setenv(backends.EMULATION_ENV_VAR, "0")
    return extension


def test_gpu_build_rejects_cpu_tensors(gpu_build):
    x = torch.randn(4, 8)
    y, rstd = torch.empty_like(x), torch.empty(4)
    with pytest.raises(ValueError, match=r"^x: the cuda backend \((cuda|hip) build\) takes CUDA "
                                         r"or ROCm tensors, got a tensor on cpu"):
        cuda_launchers.rms_norm_fwd(x, None, None, 1e-6, False, y, None, rstd)
    q = torch.randn(1, 3, 2, 8)
    cos, sin = rope_cos_sin(3, 8)
    with pytest.raises(ValueError, match=r"^q: the cuda backend"):
        cuda_launchers.rotary(q, None, torch.empty_like(q), None, cos, sin, None,
                              batch_first=True, interleaved=False, conjugate=False,
                              in_place=False)


def test_gpu_build_is_unavailable_for_cpu_tensors_through_the_op(gpu_build):
    backends._cuda_status.cache_clear()
    try:
        if torch.cuda.is_available():
            with pytest.raises(backends.BackendUnavailableError, match="cannot run on cpu"):
                apply_rotary(torch.randn(1, 3, 2, 8), None, *rope_cos_sin(3, 8), backend="cuda")
        else:
            assert not backends.backend_status("cuda").available
            assert "no GPU is visible" in backends.backend_status("cuda").reason
            with pytest.raises(backends.BackendUnavailableError, match="no GPU is visible"):
                apply_rotary(torch.randn(1, 3, 2, 8), None, *rope_cos_sin(3, 8), backend="cuda")
    finally:
        backends._cuda_status.cache_clear()


def _forward_args(**changes):
    args = dict(x=0, x_stride=8, residual=0, residual_stride=0, weight=0, y=0, y_stride=8, h=0,
                h_stride=0, rstd=0, rows=0, cols=8, eps=1e-6, zero_centered_weight=False,
                dtype=0, weight_dtype=0, device=0, stream=0)
    return {**args, **changes}


@pytest.mark.parametrize("build", ["gpu", "emulated"])
@pytest.mark.parametrize(("argument", "changes"), [
    ("dtype", dict(dtype=7)),
    ("x", dict(cols=0)),
    ("x", dict(rows=-1)),
    ("zero_centered_weight", dict(zero_centered_weight=True)),
])
def test_module_rejects_bad_arguments_before_launch(build, argument, changes):
    """The module's own checks raise ValueError naming the argument, with no GPU touched
    (these run on machines without one)."""
    if build == "gpu":
        extension = _gpu_build()
    else:
        from eurocore import _C_emulated as extension
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        extension.rms_norm_forward(**_forward_args(**changes))


@emulated
def test_backward_partials_must_match_the_device_rule():
    from eurocore import _C_emulated as extension

    partials = extension.rms_norm_backward_partials(100, 64, 2, 0)
    assert 1 <= partials <= 100
    args = dict(dy=1, dy_stride=64, dh_in=0, dh_in_stride=0, h=1, h_stride=64, weight=0,
                rstd=1, dx=1, dx_stride=64, dresidual=0, dresidual_stride=0, dw_partials=0,
                partials=partials + 1, rows=100, cols=64, zero_centered_weight=False, dtype=2,
                weight_dtype=2, device=0, stream=0)
    with pytest.raises(ValueError, match=r"^partials\b"):
        extension.rms_norm_backward(**args)


class _RecordWidths:
    """Wraps the extension and records the vector width each launcher call chose."""

    def __init__(self, extension):
        self.extension = extension
        self.widths: list[int] = []

    def __getattr__(self, name):
        attribute = getattr(self.extension, name)
        if name not in ("rms_norm_forward", "rms_norm_backward", "rotary"):
            return attribute

        def recorded(*args, **kwargs):
            self.widths.append(attribute(*args, **kwargs))

        return recorded


@pytest.fixture
def widths(monkeypatch):
    recorder = _RecordWidths(backends.cuda_extension())
    monkeypatch.setattr(cuda_launchers, "cuda_extension", lambda: recorder)
    return recorder.widths


@emulated
@pytest.mark.parametrize(("dtype", "rows", "cols", "row_stride", "expected"), [
    (torch.bfloat16, 5, 64, 64, 8),   # 16 bytes: 8 bf16
    (torch.float32, 5, 64, 64, 4),    # 16 bytes: 4 fp32
    (torch.float16, 5, 63, 63, 1),    # a row that is no whole number of vectors
    (torch.bfloat16, 5, 64, 68, 1),   # rows 136 bytes apart: not 16-byte aligned
    (torch.bfloat16, 1, 64, 68, 8),   # one row: its stride never counts
], ids=str)
@pytest.mark.parametrize("weight_offset", [0, 1], ids=["", "unaligned-weight"])
def test_rms_norm_takes_the_vector_path_where_alignment_allows(widths, dtype, rows, cols,
                                                               row_stride, expected,
                                                               weight_offset):
    """An unaligned weight (a view into a flat buffer) keeps the activations' vectors."""
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(rows, row_stride, generator=gen).to(dtype)
    x = storage[:, :cols].requires_grad_()
    flat = (1 + 0.1 * torch.randn(cols + 1, generator=gen)).to(dtype)
    w = flat[weight_offset:weight_offset + cols].requires_grad_()
    from eurocore.ops import rms_norm, rms_norm_reference

    y = rms_norm(x, w, 1e-5, backend="cuda")
    torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert widths == [expected, expected]  # forward, backward
    reference = rms_norm_reference(x.double(), w.double(), 1e-5)
    torch.testing.assert_close(y.double(), reference, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)


@emulated
@pytest.mark.parametrize(("dtype", "head_dim", "rotary_dim", "expected"), [
    (torch.bfloat16, 64, 64, 8),
    (torch.bfloat16, 64, 32, 8),    # partial: the 32 pass-through dims copy in vectors too
    (torch.bfloat16, 64, 24, 1),    # 12 pairs: no whole group of 8
    (torch.float32, 64, 24, 4),     # 12 pairs: 3 groups of 4
    (torch.float16, 20, 16, 1),     # head_dim 20: heads not 16-byte aligned
], ids=str)
def test_rotary_takes_the_vector_path_where_alignment_allows(widths, dtype, head_dim,
                                                             rotary_dim, expected):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 3, head_dim, generator=gen).to(dtype)
    k = torch.randn(2, 5, 1, head_dim, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(5, rotary_dim)
    for interleaved in (False, True):
        out_q, out_k = apply_rotary(q, k, cos, sin, interleaved=interleaved, backend="cuda")
        ref_q, ref_k = apply_rotary(q, k, cos, sin, interleaved=interleaved, backend="torch")
        assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k), interleaved
    assert widths == [expected, expected]


@pytest.fixture
def wavefront64():
    """The emulator runs the kernels with AMD CDNA's 64-wide wavefronts."""
    from eurocore import _C_emulated as extension

    extension.set_emulated_warp_size(64)
    yield
    extension.set_emulated_warp_size(32)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (17, 1025), (4, 4096), (2, 20000)], ids=str)
def test_rms_norm_with_64_wide_wavefronts(wavefront64, shape, dtype):
    """The warp and row reductions, the layouts and the weight-gradient partials with AMD's
    wavefront width: forward and backward against the float64 reference."""
    compare_rms_norm("cuda", shape, dtype, residual=True, zero_centered=False)
    compare_rms_norm("cuda", shape, dtype, residual=False, zero_centered=True)


@emulated
def test_rotary_with_64_wide_wavefronts(wavefront64):
    compare_rotary("cuda", "bshd", (2, 7, 3, 64), 1, torch.float16, 64, False)


@emulated
def test_emulator_takes_only_real_warp_widths():
    from eurocore import _C_emulated as extension

    with pytest.raises(ValueError, match=r"^width\b"):
        extension.set_emulated_warp_size(48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rotary_with_one_head_and_a_narrow_rotary_dim(dtype):
    """One group of pairs and one head per token: the block grows along tokens, within the
    GPUs' limit of 64 threads in z (the emulator enforces it)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 300, 1, 16, generator=gen).to(DEVICE, dtype)
    cos, sin = rope_cos_sin(300, 16, device=DEVICE)
    out_q, _ = apply_rotary(q, None, cos, sin, backend="cuda")
    ref_q, _ = apply_rotary(q, None, cos, sin, backend="torch")
    torch.testing.assert_close(out_q, ref_q)


def test_rotary_tables_of_two_dtypes_are_read_in_fp32():
    """cos in q's dtype and sin in fp32: both are read in fp32, as the reference does."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 2, 16, generator=gen).to(DEVICE, torch.bfloat16)
    cos, sin = rope_cos_sin(5, 16, device=DEVICE)
    cos = cos.to(torch.bfloat16)
    out_q, _ = apply_rotary(q, None, cos, sin, backend="cuda")
    ref_q, _ = apply_rotary(q.double(), None, cos, sin, backend="torch")
    same_precision, _ = apply_rotary(q, None, cos, sin, backend="torch")
    assert_close_to_reference(out_q, ref_q, same_precision, name="q_rot")


@emulated
@pytest.mark.parametrize("width", [32, 64])
def test_emulator_catches_rule_breaks(width):
    """The emulator is an oracle worth trusting: a reduction missing its second barrier gives
    wrong sums (warps drift apart as on a GPU) where the real one gives none, and threads
    leaving a barrier early, misaligned vector loads and blocks beyond NVIDIA's limits raise."""
    from eurocore import _C_emulated as extension

    extension.set_emulated_warp_size(width)
    try:
        assert extension.emulator_check("row_sum") == 0
        assert extension.emulator_check("row_sum_missing_barrier") > 0
        for name, message in [("leave_before_barrier", "diverged at a barrier"),
                              ("misaligned_load", "not aligned to 16 bytes"),
                              ("block_z_above_64", "block z above 64")]:
            with pytest.raises(RuntimeError, match=message):
                extension.emulator_check(name)
    finally:
        extension.set_emulated_warp_size(32)
