"""``AtrousConv2dReLU``: a drop-in for ``nn.Conv2d(..., dilation=r)`` [+ ``nn.BatchNorm2d``] + ``nn.ReLU`` that runs
as one fused op (``deeplab_fast.ops.atrous_conv2d``), and ``fused_conv``: the one place where the layers of
``deeplab_fast.nn`` call that op, with its export and mixed-precision policy:

- **Export** (``torch.export``, ``torch.onnx.export(..., dynamo=True)``: ``torch.compiler.is_exporting()``): the op
  is written as standard ops, ``F.conv2d`` then ``* scale + bias`` and ``relu``, so the exported graph has no
  ``deeplab_fast`` op and runs anywhere (onnxruntime, ExecuTorch, AOTInductor) with the same outputs up to
  rounding. ``torch.compile`` keeps the fused op.
- **Autocast** (``torch.autocast`` on the input's device, CPU bfloat16 or CUDA float16 / bfloat16): the op has one
  dtype for all its tensors, so the input, weight, bias and scale are cast to the autocast dtype
  (``torch.get_autocast_dtype``) and the op runs in it, as autocast runs ``F.conv2d``; the output has that
  dtype. float64 inputs are left alone (autocast leaves them too).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.atrous_conv import _pair, atrous_conv2d

__all__ = ["AtrousConv2dReLU", "fused_conv", "autocast_dtype"]

IntPair = Union[int, tuple]
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes convolutions in for ``x``'s device, or None when autocast is off
    there (or ``x`` is float64, which autocast leaves alone)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or x.dtype not in _AUTOCAST_FROM:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def fused_conv(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               scale: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1,
               relu: bool = False) -> torch.Tensor:
    """``relu?(conv2d(input, weight) * scale + bias)`` (groups = 1; per-channel ``scale`` and ``bias`` [K],
    optional): ``deeplab_fast.ops.atrous_conv2d``, or standard ops while exporting, with the autocast cast policy
    of this module's docstring (under autocast every tensor is cast to the autocast dtype; otherwise they must
    share the input's dtype, as the op requires)."""
    dtype = autocast_dtype(input)
    if dtype is not None:
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        scale = None if scale is None else scale.to(dtype)
    if torch.compiler.is_exporting():
        y = F.conv2d(input, weight, None, stride, padding, dilation)
        if scale is not None:
            y = y * scale.view(1, -1, 1, 1)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return torch.relu(y) if relu else y
    return atrous_conv2d(input, weight, bias, scale, stride, padding, dilation, relu)


class AtrousConv2dReLU(nn.Module):
    """Atrous convolution + bias (+ BatchNorm) + ReLU, fused (DeepLab, Chen et al. TPAMI 2017, sec. 3.1).

    A drop-in for ``nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
    dilation, bias=bias), nn.ReLU())``: its parameters are named ``weight`` ([K, C, R, S]) and ``bias`` ([K]),
    initialised as ``nn.Conv2d``'s, so ``load_state_dict(conv.state_dict())`` works both ways.

    Args:
        in_channels (int): C. out_channels (int): K.
        kernel_size, stride, padding, dilation (int or (int, int)): as ``nn.Conv2d`` (dilation is the atrous
            rate); defaults 3, 1, 0, 1. ``padding=dilation`` keeps a 3x3 conv's output size.
        bias (bool): learn a bias. Default True.
        relu (bool): apply ReLU. Default True.
        device, dtype: of the parameters.

    Input ``Tensor[N, C, H, W]``; output ``Tensor[N, K, P, Q]`` (channels_last when the input is). groups = 1.
    With a BatchNorm attached (``from_modules(conv, bn)`` with ``bn`` in training mode) the module keeps it
    as ``self.bn``: in training mode it runs conv, then BN on batch statistics, then ReLU; in eval mode it folds
    BN's running statistics into the op's per-channel scale and bias at every call.
    Raises ``ValueError`` on bad constructor arguments and whatever ``atrous_conv2d`` raises on bad input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair = 3, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True, relu: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"AtrousConv2dReLU: {name} must be a positive int, got {v!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride = tuple(_pair(stride, "stride"))
        self.padding = tuple(_pair(padding, "padding"))
        self.dilation = tuple(_pair(dilation, "dilation"))
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0 or min(self.dilation) < 1:
            raise ValueError(f"AtrousConv2dReLU: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
                             f"{self.kernel_size}, {self.stride}, {self.dilation}, {self.padding}")
        self.relu = bool(relu)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.bn: Optional[nn.BatchNorm2d] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation (Kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None,
                     relu: Optional[nn.Module] = None) -> "AtrousConv2dReLU":
        """Builds the fused layer from an existing ``conv`` [, ``bn``] [, ``relu``].

        - Without ``bn``, the new module shares ``conv``'s ``weight`` and ``bias`` parameters.
        - With ``bn`` in eval mode (and tracking running statistics), BN is folded: ``weight * s`` and
          ``beta + (bias - mean) * s`` with ``s = gamma / sqrt(running_var + eps)`` become new parameters.
        - With ``bn`` in training mode, BN is kept unfolded as ``self.bn`` (shared, not copied), so training
          goes on exactly as before.
        ``relu`` (an ``nn.ReLU``, or None for no ReLU) says whether to apply ReLU.

        Raises ValueError for a conv with groups != 1, a padding mode other than 'zeros', string padding, a
        BN of the wrong size, or a ``relu`` that is not ``nn.ReLU``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"from_modules: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"from_modules: only groups=1 is supported, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"from_modules: only padding_mode='zeros' is supported, got '{conv.padding_mode}'")
        if isinstance(conv.padding, str):
            raise ValueError(f"from_modules: string padding ('{conv.padding}') is not supported; give ints")
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise ValueError(f"from_modules: relu must be an nn.ReLU or None, got {type(relu).__name__}")
        if bn is not None:
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != conv.out_channels:
                raise ValueError(f"from_modules: bn must be a BatchNorm2d over {conv.out_channels} channels, "
                                 f"got {bn!r}")
        w = conv.weight
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, bias=conv.bias is not None or (bn is not None and _foldable(bn)),
                     relu=relu is not None, device="meta", dtype=w.dtype)
        if bn is not None and _foldable(bn):
            scale, shift = _bn_scale_shift(bn, conv.bias)
            with torch.no_grad():
                module.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1).to(w.dtype)).detach().clone())
                module.bias = nn.Parameter(shift.to(w.dtype).detach().clone())
        else:
            module.weight = conv.weight
            module.bias = conv.bias
            module.bn = bn
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return fused_conv(input, self.weight, self.bias, None, self.stride, self.padding, self.dilation,
                              self.relu)
        if _uses_batch_stats(self.bn):
            y = fused_conv(input, self.weight, self.bias, None, self.stride, self.padding, self.dilation, False)
            y = self.bn(y)
            return F.relu(y) if self.relu else y
        scale, shift = _bn_scale_shift(self.bn, self.bias)
        return fused_conv(input, self.weight, shift.to(self.weight.dtype), scale.to(self.weight.dtype),
                          self.stride, self.padding, self.dilation, self.relu)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"relu={self.relu}")


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or not bn.track_running_stats or bn.running_mean is None


def _foldable(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return not _uses_batch_stats(bn)


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, conv_bias: Optional[torch.Tensor]):
    """Per-channel (s, t) with BN(conv + b) = conv * s + t, from BN's running statistics (computed in float32
    or better, whatever the parameters' dtype)."""
    ref = bn.running_var
    dtype = torch.promote_types(ref.dtype, torch.float32)
    s = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.to(dtype)
    t = -bn.running_mean.to(dtype) * s
    if bn.bias is not None:
        t = t + bn.bias.to(dtype)
    if conv_bias is not None:
        t = t + conv_bias.to(dtype) * s
    return s, t
