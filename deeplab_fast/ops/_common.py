"""Helpers shared by the op modules: the refusal of gradients an op does not have, and the vocabulary of the fake
kernels' argument checks, which say what the C++ checks say (the same messages, ``ValueError``; the op tests hold
them to the C++ messages) in c10's spelling of dtypes and shapes."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_no_backward", "check_value", "check_device", "c10_dtype", "c10_shape", "c10_float"]


def register_no_backward(qualname: str, reason: str) -> None:
    """Registers an autograd formula for ``qualname`` that raises ``NotImplementedError(f"{qualname} {reason}")``
    when a gradient reaches it, rather than letting autograd drop it silently."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"{qualname} {reason}")

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def check_value(cond, op: str, message: Callable[[], str]) -> None:
    """Raises ``ValueError(f"{op}: {message()}")`` unless ``cond`` (a bool or a symbolic one: ``torch._check_value``
    guards it while tracing), as the C++ checks' ``TORCH_CHECK_VALUE``."""
    torch._check_value(cond, lambda: f"{op}: {message()}")


def check_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    """``t`` must be on ``ref``'s device (``ValueError`` otherwise). Fake kernels call it, so a meta or
    wrong-device argument is refused before any output is made."""
    check_value(t.device == ref.device, op, lambda: f"{name} is on {t.device} but the {ref_name} is on {ref.device}")


def c10_dtype(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it in the C++ messages ("Float", "BFloat16", "Long")."""
    try:
        return torch.empty(0, dtype=dtype, device="meta").type().rpartition(".")[2].removesuffix("Tensor")
    except (RuntimeError, TypeError):
        return str(dtype)


def c10_shape(shape) -> str:
    """Sizes as c10 prints them ("[2, 3, 5]")."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def c10_float(x: float) -> str:
    """A double as C++'s ``operator<<`` prints it (six significant digits: "9.53674e-06", "80", "1e+300")."""
    return f"{x:g}"
