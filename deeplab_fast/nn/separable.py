"""``AtrousSeparableConv2d``: the depthwise-separable atrous convolution of DeepLab v3+ (Chen et al., "Encoder-Decoder
with Atrous Separable Convolution for Semantic Image Segmentation", ECCV 2018, sec. 3.1 and fig. 3), as a drop-in
layer whose eval-mode forward folds its BatchNorms.

Two layouts, both in use:

- ``depthwise_bn=True`` (the paper's and the official TensorFlow code's ``split_separable_conv2d``, after
  Xception): depthwise atrous conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU.
- ``depthwise_bn=False`` (segmentation_models_pytorch's ``SeparableConv2d`` followed by its BN and ReLU):
  depthwise atrous conv -> pointwise 1x1 conv -> BN -> ReLU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import positive_int
from .atrous import _bn_scale_shift, _uses_batch_stats, fused_conv

__all__ = ["AtrousSeparableConv2d"]


class AtrousSeparableConv2d(nn.Module):
    """Depthwise atrous conv [+ BN + ReLU] + pointwise 1x1 conv + BN + ReLU (DeepLab v3+, sec. 3.1).

    Args:
        in_channels (int): C. out_channels (int): K.
        kernel_size (int): the depthwise filter's size (square). Default 3.
        dilation (int): the atrous rate of the depthwise conv. Default 1.
        padding (int or None): of the depthwise conv; None (default): ``dilation * (kernel_size - 1) // 2``, the
            output keeps the input's size ("SAME" at stride 1).
        stride (int): of the depthwise conv. Default 1.
        depthwise_bn (bool): BN + ReLU after the depthwise conv (the paper's layout, default True); False:
            none (segmentation_models_pytorch's layout).
        bias (bool): a bias on the pointwise conv (before its BN). Default False.
        eps (float): the BNs' epsilon. Default 1e-5 (the official code's).

    Modules: ``depthwise`` (``nn.Conv2d(C, C, kernel_size, groups=C, bias=False)``), ``depthwise_bn``
    (``nn.BatchNorm2d(C)`` or None), ``pointwise`` (``nn.Conv2d(C, K, 1)``), ``pointwise_bn``
    (``nn.BatchNorm2d(K)``).

    Input Tensor[N, C, H, W] (floating point); output Tensor[N, K, P, Q]. In training mode, or with a BN that
    has no running statistics, it runs the modules one after the other (plain torch, differentiable). In eval
    mode it folds the BNs: the depthwise conv runs with ``weight * s`` and bias ``t`` then ReLU (one
    ``F.conv2d``; ``deeplab_fast.ops.atrous_conv2d`` takes groups = 1 only), and the pointwise conv, its BN and
    ReLU are one ``deeplab_fast.ops.atrous_conv2d`` call (standard ops while exporting, the autocast dtype under
    autocast: ``deeplab_fast.nn.atrous.fused_conv``). The eval outputs equal the unfolded ones up to rounding.
    Raises ValueError on bad arguments.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 padding: Optional[int] = None, stride: int = 1, depthwise_bn: bool = True, bias: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        owner = "AtrousSeparableConv2d"
        self.in_channels = positive_int(in_channels, "in_channels", owner)
        self.out_channels = positive_int(out_channels, "out_channels", owner)
        k = positive_int(kernel_size, "kernel_size", owner)
        d = positive_int(dilation, "dilation", owner)
        s = positive_int(stride, "stride", owner)
        if padding is None:
            padding = d * (k - 1) // 2
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"{owner}: padding must be a non-negative int or None, got {padding!r}")
        self.depthwise = nn.Conv2d(in_channels, in_channels, k, stride=s, padding=padding, dilation=d,
                                   groups=in_channels, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(in_channels, eps=eps) if depthwise_bn else None
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bool(bias))
        self.pointwise_bn = nn.BatchNorm2d(out_channels, eps=eps)

    @property
    def dilation(self) -> int:
        return int(self.depthwise.dilation[0])

    def _folds(self) -> bool:
        return not self.training and all(
            not _uses_batch_stats(bn) for bn in (self.depthwise_bn, self.pointwise_bn) if bn is not None)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The modules one after the other (training, batch statistics)."""
        y = self.depthwise(x)
        if self.depthwise_bn is not None:
            y = F.relu(self.depthwise_bn(y))
        return F.relu(self.pointwise_bn(self.pointwise(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._folds():
            return self.reference_forward(x)
        dw = self.depthwise
        weight = dw.weight
        if self.depthwise_bn is not None:
            s, t = _bn_scale_shift(self.depthwise_bn, None)
            y = F.conv2d(x, weight * s.to(weight.dtype).view(-1, 1, 1, 1), t.to(weight.dtype), dw.stride,
                         dw.padding, dw.dilation, dw.groups)
            y = F.relu(y)
        else:
            y = F.conv2d(x, weight, None, dw.stride, dw.padding, dw.dilation, dw.groups)
        pw = self.pointwise
        s, t = _bn_scale_shift(self.pointwise_bn, pw.bias)
        return fused_conv(y, pw.weight, t.to(pw.weight.dtype), s.to(pw.weight.dtype), 1, 0, 1, relu=True)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, "
                f"depthwise_bn={self.depthwise_bn is not None}")
