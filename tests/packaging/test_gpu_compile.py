"""The CUDA/HIP sources in csrc/ compile into eurocore._C with nvcc (sm_80, sm_90a) and with
Debian's hipcc (gfx90a), warnings as errors, and the built module imports without a GPU.

Each test configures and builds the repository's CMakeLists.txt in a temporary directory, as
`pip install` would, so a source that only one vendor's compiler rejects fails here, on a
machine without a GPU, rather than on the first cluster that builds it. A compiler that is
missing skips its test, except where the environment variable CI is "true" (or "1"): CI must
compile with both (.ci/run installs Debian's hipcc through scripts/install_hipcc.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
JOBS = "2"  # the CI machine's cores
BUILD_TIMEOUT_S = 900
TAIL_LINES = 60

# Runs in a fresh interpreter: the module loads a vendor runtime (libamdhip64) that should not
# stay in the test process, and `eurocore` itself is not imported, only the built file.
_IMPORT_PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("eurocore._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps({"backend": module.gpu_backend(), "archs": module.gpu_archs(),
                  "devices": module.gpu_device_count()}))
"""


def _require(*tools: str) -> None:
    """Skip (or, in CI, fail) unless every tool is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        reason = f"{', '.join(missing)} not found on PATH"
        if IN_CI:
            pytest.fail(f"{reason}: CI must compile the CUDA and HIP sources", pytrace=False)
        pytest.skip(reason)


def _tail(text: str) -> str:
    """The last lines of a build log: where the compiler's error is."""
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def _run(cmd: list[str], what: str, **kwargs) -> str:
    """Run cmd; on failure, fail the test with the command and the end of its output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=BUILD_TIMEOUT_S, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"--- last {TAIL_LINES} lines ---\n{_tail(proc.stdout)}", pytrace=False)
    return proc.stdout


def _cmake_build(build: Path, backend: str, *defines: str) -> Path:
    """Configure and build the repository's _C for backend; return the built module."""
    pybind11_dir = _run([sys.executable, "-m", "pybind11", "--cmakedir"], "pybind11").strip()
    _run(["cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja",
          "-DCMAKE_BUILD_TYPE=Release", f"-DEUROCORE_GPU_BACKEND={backend}",
          f"-Dpybind11_DIR={pybind11_dir}", f"-DPython_EXECUTABLE={sys.executable}",
          *defines], f"CMake configure ({backend})")
    _run(["cmake", "--build", str(build), "-j", JOBS], f"CMake build ({backend})")
    (module,) = build.glob("_C.*.so")  # not _C_emulated
    return module


def _assert_every_source_built(build: Path) -> None:
    """Each csrc/*.cu is compiled into _C: a kernel file left out of CMakeLists.txt would
    otherwise escape both compilers."""
    objects = build / "CMakeFiles" / "_C.dir" / "csrc"
    missing = [cu.name for cu in sorted((REPO / "csrc").glob("*.cu"))
               if not (objects / f"{cu.name}.o").exists()]
    assert not missing, f"not compiled into _C (list them in CMakeLists.txt): {missing}"


def _import_module(module: Path) -> dict:
    """Import the built file as eurocore._C in a fresh interpreter; return what it reports."""
    out = _run([sys.executable, "-c", _IMPORT_PROBE, str(module)], f"importing {module.name}",
               cwd=module.parent)
    return json.loads(out.strip().splitlines()[-1])


def _needed_libraries(module: Path) -> list[str]:
    """The shared libraries the module's ELF header asks for (readelf -d, NEEDED)."""
    if shutil.which("readelf") is None:
        return []
    out = _run(["readelf", "-d", str(module)], "readelf -d")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _assert_no_torch_link(module: Path) -> None:
    """The module takes pointers from Python and links no libtorch or c10: a torch upgrade
    never forces a rebuild."""
    needed = _needed_libraries(module)
    assert not [lib for lib in needed if lib.startswith(("libtorch", "libc10"))], needed


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships (pip CUDA toolkits, as
    on the CI machine, have nvcc without it)."""
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    spec = find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "backends/nvidia/bin/cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# Clang's offload bundle, as embedded in the .hip_fatbin section: the magic string, the number
# of entries (u64), then per entry the offset (from the magic), size, and id length (u64 each)
# and the id (e.g. "hipv4-amdgcn-amd-amdhsa--gfx90a").
_BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
_EM_AMDGPU = 224
# EF_AMDGPU_MACH_* values (low byte of e_flags) of the LLVM AMDGPU ELF ABI.
_AMDGPU_MACH = {"gfx90a": 0x3F}


def _offload_entries(data: bytes) -> list[tuple[str, bytes]]:
    """(entry id, code object) of every non-empty entry of every offload bundle in a binary:
    clang makes one bundle per source file with device code."""
    objects: list[tuple[str, bytes]] = []
    start = data.find(_BUNDLE_MAGIC)
    while start >= 0:
        (count,) = struct.unpack_from("<Q", data, start + len(_BUNDLE_MAGIC))
        pos = start + len(_BUNDLE_MAGIC) + 8
        for _ in range(count):
            offset, size, id_len = struct.unpack_from("<QQQ", data, pos)
            entry_id = data[pos + 24:pos + 24 + id_len].decode()
            pos += 24 + id_len
            if size:
                objects.append((entry_id, data[start + offset:start + offset + size]))
        start = data.find(_BUNDLE_MAGIC, pos)
    return objects


@pytest.mark.slow
def test_nvcc_builds_and_imports(tmp_path):
    """nvcc builds _C for sm_80 and sm_90a (--Werror=all-warnings, from CMakeLists.txt) and
    the module, its CUDA runtime linked statically, imports without a driver."""
    _require("nvcc", "cmake", "ninja")
    module = _cmake_build(tmp_path / "build", "CUDA", "-DCMAKE_CUDA_ARCHITECTURES=80;90a")
    _assert_every_source_built(tmp_path / "build")

    _assert_no_torch_link(module)
    assert not [lib for lib in _needed_libraries(module) if "cudart" in lib], "static runtime"
    info = _import_module(module)
    assert info["backend"] == "cuda"
    assert info["archs"] == "80,90a"
    if not torch.cuda.is_available():
        assert info["devices"] == 0

    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return  # nowhere to read the fat binary from; the build itself passed
    listing = _run([cuobjdump, "--list-elf", str(module)], "cuobjdump --list-elf")
    cubins = set(re.findall(r"\.(sm_\w+)\.cubin", listing))
    assert cubins == {"sm_80", "sm_90a"}, listing


@pytest.mark.slow
def test_hipcc_builds_and_imports(tmp_path):
    """clang (Debian's hipcc toolchain, through CMake's HIP language) builds _C for gfx90a with
    -Wall -Wextra -Werror, the module holds gfx90a code, and it imports without a GPU.

    Importing loads libamdhip64; without a GPU or the amdgpu driver hipGetDeviceCount fails
    and the module reports no devices, so the import itself is meaningful here.
    """
    _require("hipcc", "cmake", "ninja")
    build = tmp_path / "build"
    module = _cmake_build(build, "HIP", "-DCMAKE_HIP_ARCHITECTURES=gfx90a")
    _assert_every_source_built(build)

    _assert_no_torch_link(module)
    info = _import_module(module)
    assert info["backend"] == "hip"
    assert info["archs"] == "gfx90a"
    if not torch.cuda.is_available():
        assert info["devices"] == 0

    entries = _offload_entries(module.read_bytes())
    ids = [entry_id for entry_id, _ in entries]
    assert entries, f"no device code object in {module.name}"
    assert all(entry_id == "hipv4-amdgcn-amd-amdhsa--gfx90a" for entry_id in ids), ids
    for _, code in entries:  # each an AMDGPU ELF for gfx90a
        assert code[:4] == b"\x7fELF"
        (machine,) = struct.unpack_from("<H", code, 18)
        (flags,) = struct.unpack_from("<I", code, 48)
        assert machine == _EM_AMDGPU
        assert flags & 0xFF == _AMDGPU_MACH["gfx90a"]


@pytest.mark.slow
def test_hip_default_architectures_are_those_the_compiler_supports(tmp_path):
    """Without CMAKE_HIP_ARCHITECTURES the HIP build targets gfx90a and gfx942, less those the
    compiler cannot build (Debian's clang 15 has no gfx942), each dropped with a message.
    Configure only: the build is the test above."""
    _require("hipcc", "cmake", "ninja")
    pybind11_dir = _run([sys.executable, "-m", "pybind11", "--cmakedir"], "pybind11").strip()
    out = _run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja",
                "-DEUROCORE_GPU_BACKEND=HIP", f"-Dpybind11_DIR={pybind11_dir}",
                f"-DPython_EXECUTABLE={sys.executable}"], "CMake configure (HIP, default archs)")
    match = re.search(r"eurocore: HIP architectures (\S+)", out)
    assert match, _tail(out)
    archs = match.group(1).split(";")
    assert archs[0] == "gfx90a"
    assert set(archs) <= {"gfx90a", "gfx942"}
    for dropped in {"gfx90a", "gfx942"} - set(archs):
        assert f"dropping HIP architecture {dropped}" in out
