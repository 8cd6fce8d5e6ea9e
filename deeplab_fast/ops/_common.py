"""Helpers shared by the op modules: the refusal of gradients an op does not have, and the device rule that
real and fake kernels check alike."""
from __future__ import annotations

import torch

__all__ = ["register_no_backward", "check_device"]


def register_no_backward(qualname: str, reason: str) -> None:
    """Registers an autograd formula for ``qualname`` that raises ``NotImplementedError(f"{qualname} {reason}")``
    when a gradient reaches it, rather than letting autograd drop it silently."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"{qualname} {reason}")

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def check_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str,
                 allow_cpu: bool = False) -> None:
    """Raises (via ``torch._check``) unless ``t`` is on ``ref``'s device (or on the CPU, with ``allow_cpu``).
    Fake kernels call it, so a meta or wrong-device argument is refused before any output is made."""
    ok = t.device == ref.device or (allow_cpu and t.device.type == "cpu")
    torch._check(ok, lambda: f"{op}: {name} is on {t.device} but the {ref_name} is on {ref.device}"
                             + ("; it must be on the CPU or on the same device" if allow_cpu else ""))
