"""The package layout survives a regular (non-editable) install, and the C++ extension is
optional: built where a CUDA/HIP toolkit was found, absent and explained elsewhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eurocore.ops import available_backends, backends

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-C", "cmake.define.EUROCORE_GPU_BACKEND=NONE", "-C", f"build-dir={out / 'build'}",
         "-w", str(out), str(REPO)],
        check=True,
    )
    (path,) = out.glob("eurocore-*.whl")
    return path


@pytest.mark.slow
def test_wheel_maps_kernels_and_benchmarks_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "eurocore/kernels/rms_norm.py" in names
    assert "eurocore/benchmarks/__main__.py" in names
    assert not any(n.startswith(("kernels/", "benchmarks/")) for n in names), "top-level module"
    assert not any("/results/" in n for n in names), "measured results do not ship"


@pytest.mark.slow
def test_regular_install_imports_eurocore_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    # An editable install of the repository may be active: drop its import redirect so the
    # wheel's files are the ones imported.
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
            "if 'ScikitBuild' not in type(f).__name__]; "
            "import eurocore.kernels.rms_norm as k, eurocore.ops as o; print(k.__file__); "
            "print(o.available_backends()['cuda'].reason)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(target)), out[0]
    assert "not built" in out[1]


@pytest.fixture
def gpu_build_status(monkeypatch):
    """The cuda backend's status as the GPU build eurocore._C gives it (emulator off)."""
    monkeypatch.setenv(backends.EMULATION_ENV_VAR, "0")
    backends._cuda_status.cache_clear()
    yield
    backends._cuda_status.cache_clear()


def test_cuda_backend_status_matches_the_build(gpu_build_status):
    try:
        from eurocore import _C
    except ImportError:
        assert "not built" in available_backends()["cuda"].reason
        return
    assert _C.gpu_backend() in ("cuda", "hip")
    assert _C.gpu_archs()
    if _C.gpu_device_count() == 0:
        assert not available_backends()["cuda"].available
        assert "no GPU is visible" in available_backends()["cuda"].reason
