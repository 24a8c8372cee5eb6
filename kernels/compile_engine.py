"""The ahead-of-time compile engine: a kernel configuration compiled for a named GPU target,
no GPU needed, and what the compiler's output says about it.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))`` runs
the whole compiler (TTIR → TTGIR → LLVM → PTX/cubin or AMDGCN/hsaco) for a target that is
not present, so CI on a CPU machine catches what the first real GPU would otherwise meet: a
compile error, a launch too large for the hardware, spills, loads left unvectorised.

An :class:`AotCase` is one compilation: a kernel, its specialised signature and its launch
options. :func:`aot_case` makes one from a kernel module's launch plan (a
``eurocore.kernels.launch.Launch``), specialised as Triton's JIT would specialise that launch
(see :func:`specialise`); ``eurocore.kernels.aot`` lists the op-level cases each kernel is
compiled for. :func:`compile_case` compiles one case for one target and returns an
:class:`AotReport`; :func:`compile_all` compiles many, in worker processes when asked to or
when it has to (below).

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

Imports only the standard library and Triton (not torch: a plan's tensors, or the
``TensorSpec`` s standing in for them, are read through ``.dtype`` and ``.data_ptr()``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

if TYPE_CHECKING:
    from .launch import Launch

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
# Case lists: the launch configurations a launcher can emit
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
    """A launch configuration (or any flat dict) as a hashable, order-free key."""
    return tuple(sorted(cfg.items()))


# ---------------------------------------------------------------------------------------------
# A launch plan's compilation
# ---------------------------------------------------------------------------------------------

# Triton's pointer element types, by the name of a torch dtype (str(torch.bfloat16)): read by
# name so that this module needs no torch.
POINTER_TYPES: dict[str, str] = {
    "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
    "torch.float64": "fp64", "torch.int8": "i8", "torch.int16": "i16", "torch.int32": "i32",
    "torch.int64": "i64", "torch.uint8": "u8", "torch.bool": "i1",
    "torch.float8_e4m3fn": "fp8e4nv", "torch.float8_e5m2": "fp8e5",
    "torch.float8_e4m3fnuz": "fp8e4b8", "torch.float8_e5m2fnuz": "fp8e5b16",
}
# Triton's default when a launch passes no num_warps.
DEFAULT_NUM_WARPS = 4


def kernel_name(fn: Any) -> str:
    """A @triton.jit kernel's name, interpreted or not."""
    return getattr(fn, "fn", fn).__name__


def aot_case(launch: Launch, label: str = "", vendors: Sequence[str] = ()) -> AotCase:
    """The compilation Triton's JIT makes of ``launch`` (a kernel module plan's Launch, over
    real tensors or ``TensorSpec`` s), as :func:`specialise` derives it from the runtime
    arguments: a tensor is a pointer to its dtype, divisible when its data pointer is 16-byte
    aligned; an int is "i32" (or "i64"), divisible when a multiple of 16, or the constexpr 1;
    a float is "fp32". The launch options become the case's ``num_warps``, ``num_stages``
    (None: the backend's default) and further ``options`` (``waves_per_eu``). ``vendors``: the
    vendors whose launchers emit this configuration (see :meth:`AotCase.applies_to`).
    """
    fn = launch.kernel
    params = kernel_params(fn)
    name = kernel_name(fn)
    n_args = len(launch.args)
    # Bound as Python binds kernel[grid](*args, **constexprs, **options): the positional
    # arguments fill the first parameters, the constexpr keywords exactly the rest.
    if n_args > len(params) or set(params[n_args:]) != set(launch.constexprs):
        raise ValueError(f"{name}: {n_args} arguments and constexprs "
                         f"{sorted(launch.constexprs)} do not bind its parameters {params}")
    values = {param: _jit_value(name, param, value)
              for param, value in zip(params, launch.args, strict=False)}
    signature, constexprs, divisible = specialise(params, values, launch.constexprs)
    options = dict(launch.options)
    num_warps = options.pop("num_warps", DEFAULT_NUM_WARPS)
    num_stages = options.pop("num_stages", None)
    return AotCase(name, fn, signature, constexprs, num_warps, num_stages, divisible, label,
                   options, tuple(vendors))


def _jit_value(kernel: str, param: str, value: Any) -> Any:
    """A runtime argument as :func:`specialise` takes it: a tensor (or TensorSpec) as a Ptr."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        dtype = POINTER_TYPES.get(str(value.dtype))
        if dtype is None:
            raise TypeError(f"{kernel}: {param} has dtype {value.dtype}, which has no Triton "
                            f"pointer type here; known: {', '.join(POINTER_TYPES)}")
        return Ptr(dtype, value.data_ptr() % 16 == 0)
    return value


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


def target_name(target: GPUTarget) -> str:
    """The name of :data:`TARGETS` for ``target`` ("sm_90" ...), else one made like them."""
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
