"""The door: ``applies(x)`` says whether the CPU kernels run for ``x``; ``DDPM_CPU_KERNELS=0`` and ``enabled``
switch them off (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

_ONEDNN = torch.backends.mkldnn.is_available()
_mkldnn_ops = torch.ops.mkldnn
_BF16 = _ONEDNN and hasattr(_mkldnn_ops, "_is_mkldnn_bf16_supported") and bool(
    _mkldnn_ops._is_mkldnn_bf16_supported())
_switch = [os.environ.get("DDPM_CPU_KERNELS", "1") != "0"]  # in a list: enabled() flips it for a block


# fx.symbolic_trace (torch >= 2.7 names it apart from torch.export, which is_compiling() covers)
_fx_tracing: Callable[[], bool] = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                                          torch.fx._symbolic_trace.is_fx_tracing)
# torch.func transforms (grad, vmap, jacrev, ...): the kernels' autograd Functions do not support them
_functorch_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's where autocast is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def applies(x: Tensor, module: nn.Module | None = None) -> bool:
    """Whether the CPU kernels run for ``x``: CPU with oneDNN, float32 or (CPU-supported) bfloat16, not traced,
    not switched off. With ``module`` (a kernel that stands in for its submodules, calling none of them), also: no
    hooks on any submodule, so that every hook a user registered still runs."""
    # Tracers and transforms first (torch.compile / torch.export, jit.trace, fx, torch.func): they get the plain
    # path. Under dynamo nothing else is read, so nothing is guarded on.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_tracing() or _functorch_active():
        return False
    if not (_switch[0] and _ONEDNN and x.device.type == "cpu"):
        return False
    dtype = compute_dtype(x)
    if not (dtype == torch.float32 or (dtype == torch.bfloat16 and _BF16)):
        return False
    return module is None or not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    if _global_hooks():
        return True
    # the submodules, depth first (a plain walk: ``module.modules()`` costs ~7 us a module, run per block per step)
    pending = list(module._modules.values())
    while pending:
        m = pending.pop()
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        pending.extend(m._modules.values())
    return False


def _global_hooks() -> bool:
    # hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)
    g = torch.nn.modules.module
    return any(getattr(g, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def switched_on() -> bool:
    """Whether the kernels are switched on (``DDPM_CPU_KERNELS``, ``enabled``): the trainer's CPU settings ask too."""
    return _switch[0]


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Switch the kernels on or off for the calls made in this block (process-wide, not thread-local)."""
    before = _switch[0]
    _switch[0] = on
    try:
        yield
    finally:
        _switch[0] = before
