"""The eager fast path: the one place where an op call chooses between its ``torch.library``
custom op and a direct call of the same implementation.

Every kernel op is registered as a custom op, with a fake implementation and its autograd
formula, so that torch.compile, torch.export, FakeTensorMode and other dispatch modes see it
as one opaque node. In plain eager mode that registration is pure host cost: the dispatcher
fills in defaults, redispatches below autograd, wraps the call in a dynamo-disabled frame and
checks the outputs for aliasing; on the CPU with the kernel launch stubbed out it was
30-60 % of a forward's host time (``python -m eurocore.benchmarks host``).

:func:`custom_op` registers a function exactly as ``torch.library.custom_op`` does and returns
a :class:`CustomOp`. Calling it takes one of two paths, decided by
:func:`eager_fast_path_allowed` and nowhere else:

- the eager fast path: the implementation itself, and, when autograd has to record the call,
  an ``autograd.Function`` built from the very ``setup_context`` and ``backward`` the custom op
  registers; mutated arguments get their version counters bumped as the dispatcher would;
- the custom-op path: ``torch.ops.<namespace>.<name>``, as every call went before.

Both run the same launcher on the same tensors, so their results are bitwise equal (tested in
``tests/ops/test_fast_path.py``). The fast path is never taken while torch.compile, torch.jit
tracing or a functorch transform (vmap, grad) runs, under a ``TorchDispatchMode`` (FakeTensor,
selective-checkpoint policies, FlopCounter, ...) or a ``TorchFunctionMode`` other than the
default-device one, or when an argument is a tensor subclass: all of those must see the
custom op. ``EUROCORE_EAGER_FAST_PATH=0`` (read at import) or :func:`set_eager_fast_path`
turns it off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._device import DeviceContext

ENV_VAR = "EUROCORE_EAGER_FAST_PATH"

# The predicate reads torch internals that torch does not promise to keep (written against
# 2.13): where one is missing, the fast path is off and every call takes the custom op.
_SUPPORTED = all(hasattr(torch._C, name) for name in (
    "_is_tracing", "_are_functorch_transforms_active", "_len_torch_dispatch_stack",
    "_is_torch_function_mode_enabled", "_any_requires_grad")) and \
    hasattr(torch.autograd.graph, "increment_version")
_enabled = _SUPPORTED and \
    os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")
# Exactly these tensor types go straight to a launcher; any subclass (DTensor, FakeTensor,
# FunctionalTensor, a user's wrapper) takes the custom-op path, where its own dispatch runs.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

# Every op made by custom_op, by its qualified name ("eurocore::rms_norm_fwd").
REGISTRY: dict[str, CustomOp] = {}


def set_eager_fast_path(enabled: bool) -> bool:
    """Turns the eager fast path on or off for the whole process; returns the previous
    setting. Off, every call goes through ``torch.ops.eurocore.*`` (the slower, reference
    path); results are the same either way."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, enabled and _SUPPORTED
    return previous


@contextlib.contextmanager
def eager_fast_path(enabled: bool) -> Iterator[None]:
    """Within the block, the eager fast path is on (``True``) or off (``False``); the previous
    setting comes back afterwards. Process-wide, not per thread."""
    previous = set_eager_fast_path(enabled)
    try:
        yield
    finally:
        set_eager_fast_path(previous)


def eager_fast_path_allowed() -> bool:
    """Whether an op called now may skip its custom op: the setting is on, and nothing that
    must see the op as a ``torch.library`` node is active (torch.compile or export tracing,
    torch.jit tracing, a functorch transform, a dispatch mode, a torch-function mode other
    than ``torch.set_default_device``'s). The arguments are checked by :class:`CustomOp`."""
    # is_compiling first: dynamo folds it to True, so a traced graph never reads the rest.
    if torch.compiler.is_compiling() or not _enabled:
        return False
    if torch._C._is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    # FakeTensorMode and the proxy modes of make_fx/AOTAutograd count here too (infra modes),
    # as do selective-checkpoint policies and FlopCounterMode.
    if torch._C._len_torch_dispatch_stack():
        return False
    return not torch._C._is_torch_function_mode_enabled() or _only_default_device_modes()


def _only_default_device_modes() -> bool:
    """True when every active torch-function mode is ``torch.set_default_device``'s, which
    changes where factory functions allocate and nothing else: the implementations allocate
    on their inputs' device, so that mode does not need to see the op."""
    modes = torch.overrides._get_current_function_mode_stack()
    return all(isinstance(mode, DeviceContext) for mode in modes)


class CustomOp:
    """A ``torch.library`` custom op together with its eager fast path.

    Registered exactly as ``torch.library.custom_op(name, fn, mutates_args=...)`` would be;
    :meth:`register_fake` and :meth:`register_autograd` register with it as well. Calling the
    object runs ``fn`` directly when :func:`eager_fast_path_allowed` (and every tensor argument
    is a plain tensor), else ``torch.ops.<namespace>.<name>``.
    """

    def __init__(self, name: str, fn: Callable[..., Any], mutates_args: Sequence[str]) -> None:
        self.name = name
        self._impl = fn
        self._def = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
        namespace, opname = name.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), opname).default
        arguments = self.overload._schema.arguments
        # Positions of the tensor (and optional tensor) arguments: checked per call for
        # subclasses. Positions of tensor-list arguments: each element checked.
        self._tensor_positions = tuple(
            i for i, a in enumerate(arguments) if _is_tensor_type(a.type))
        self._tensor_list_positions = tuple(
            i for i, a in enumerate(arguments) if _is_tensor_list_type(a.type))
        mutated = set(mutates_args)
        self._mutated_positions = tuple(i for i, a in enumerate(arguments) if a.name in mutated)
        self._function: type[torch.autograd.Function] | None = None
        REGISTRY[name] = self

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Registers the fake (meta) implementation; returns ``fn`` (usable as a decorator)."""
        self._def.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable[..., Any], *,
                          setup_context: Callable[..., Any]) -> None:
        """Registers the autograd formula with the custom op, and builds the fast path's
        ``autograd.Function`` from the same two functions."""
        self._def.register_autograd(backward, setup_context=setup_context)
        self._function = _autograd_function(self.name, self._impl, setup_context, backward)

    def __call__(self, *args: Any) -> Any:
        """Runs the op on positional arguments (in the schema's order) by one of the two
        paths (module docstring)."""
        if eager_fast_path_allowed() and self._plain_tensors(args):
            return self._call_fast(*args)
        return self.overload(*args)

    def _call_fast(self, *args: Any) -> Any:
        """The eager fast path itself: what the custom op's autograd and backend kernels would
        do, without the dispatcher between them."""
        if (self._function is not None and torch.is_grad_enabled()
                and torch._C._any_requires_grad(*args)):
            output = self._function.apply(*args)
        else:  # as the custom op's autograd kernel: no recording needed, the bare kernel
            output = self._impl(*args)
        for i in self._mutated_positions:
            if args[i] is not None:  # the dispatcher's ADInplaceOrView kernel does this
                torch.autograd.graph.increment_version(args[i])
        return output

    def _plain_tensors(self, args: tuple[Any, ...]) -> bool:
        for i in self._tensor_positions:
            arg = args[i]
            if arg is not None and type(arg) not in _PLAIN_TENSOR_TYPES:
                return False
        for i in self._tensor_list_positions:
            if any(type(t) not in _PLAIN_TENSOR_TYPES for t in args[i] or ()):
                return False
        return True


def custom_op(name: str, *, mutates_args: Sequence[str] = ()
              ) -> Callable[[Callable[..., Any]], CustomOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=...)`` with the eager fast path
    (:class:`CustomOp`). ``fn`` must take its arguments positionally, as every eurocore op
    does; keyword-only arguments are not supported."""

    def register(fn: Callable[..., Any]) -> CustomOp:
        return CustomOp(name, fn, mutates_args)

    return register


def _autograd_function(name: str, impl: Callable[..., Any], setup_context: Callable[..., Any],
                       backward: Callable[..., Any]) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` torch.library generates for a custom op with
    ``register_autograd`` (torch/_library/autograd.py), less the redispatch: forward runs
    ``impl`` and then ``setup_context`` on the same inputs and output, backward is
    ``backward``. Grad materialisation stays on (the default there too), so the backward sees
    the same zeros for unused outputs on both paths."""

    def forward(ctx: Any, *args: Any) -> Any:
        output = impl(*args)
        setup_context(ctx=ctx, inputs=args, output=output)
        return output

    return type(f"EagerFastPath_{name.replace('::', '_')}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def _is_tensor_type(t: Any) -> bool:
    if isinstance(t, torch._C.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch._C.TensorType)


def _is_tensor_list_type(t: Any) -> bool:
    if isinstance(t, torch._C.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch._C.ListType) and _is_tensor_type(t.getElementType())
