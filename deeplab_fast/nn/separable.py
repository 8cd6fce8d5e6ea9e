"""``AtrousSeparableConv2d``: the depthwise-separable atrous convolution of DeepLab v3+ (Chen et al., "Encoder-Decoder
with Atrous Separable Convolution for Semantic Image Segmentation", ECCV 2018, sec. 3.1 and fig. 3), as a drop-in
layer whose eval-mode forward folds its BatchNorms.

Two layouts, both in use:

- ``depthwise_bn=True`` (the paper's and the official TensorFlow code's ``split_separable_conv2d``, after
  Xception): depthwise atrous conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU.
- ``depthwise_bn=False`` (segmentation_models_pytorch's ``SeparableConv2d`` followed by its BN and ReLU):
  depthwise atrous conv -> pointwise 1x1 conv -> BN -> ReLU.

Both run as one fused op in eval mode (``deeplab_fast.ops.separable_conv2d``, called through
``fused_separable_conv``, which has ``deeplab_fast.nn.atrous``'s export and autocast policy: standard ops while
exporting, every tensor in the autocast dtype under autocast). ``FusedSeparableConv2d`` is the same layer with its
BNs folded into the filters once (what ``deeplab_fast.optimize`` swaps in).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import positive_int
from ..ops.separable_conv import separable_conv2d, separable_conv2d_reference
from .atrous import _bn_scale_shift, _uses_batch_stats, autocast_cast

__all__ = ["AtrousSeparableConv2d", "FusedSeparableConv2d", "fused_separable_conv"]


def fused_separable_conv(input: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                         dw_scale: Optional[torch.Tensor], pw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor],
                         pw_scale: Optional[torch.Tensor], stride=1, padding=0, dilation=1, dw_relu: bool = True,
                         pw_relu: bool = True) -> torch.Tensor:
    """``deeplab_fast.ops.separable_conv2d`` (arguments and shapes there), or the same computation as standard ops
    (``separable_conv2d_reference``) while exporting, with the autocast cast policy of ``deeplab_fast.nn.atrous``:
    under autocast every tensor is cast to the autocast dtype; otherwise they must share the input's dtype."""
    args = autocast_cast(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale)
    if torch.compiler.is_exporting():
        return separable_conv2d_reference(*args, stride, padding, dilation, dw_relu, pw_relu)
    return separable_conv2d(*args, stride, padding, dilation, dw_relu, pw_relu)


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
    mode it folds the BNs into the per-channel scales and biases of one ``deeplab_fast.ops.separable_conv2d`` call
    (``fused_separable_conv``: standard ops while exporting, the autocast dtype under autocast), at every call;
    ``FusedSeparableConv2d.from_module`` folds them once. The eval outputs equal the unfolded ones up to rounding.
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

    def folded(self) -> tuple:
        """The eval-mode BN folds as float32 (or float64) vectors: (dw_scale, dw_shift, pw_scale, pw_shift), the
        depthwise pair None without a depthwise BN. The pointwise conv's bias is in pw_shift."""
        dw = (None, None) if self.depthwise_bn is None else _bn_scale_shift(self.depthwise_bn, None)
        return (*dw, *_bn_scale_shift(self.pointwise_bn, self.pointwise.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._folds():
            return self.reference_forward(x)
        dw, pw = self.depthwise, self.pointwise
        dtype = dw.weight.dtype
        dw_s, dw_t, pw_s, pw_t = (None if v is None else v.to(dtype) for v in self.folded())
        return fused_separable_conv(x, dw.weight, dw_t, dw_s, pw.weight, pw_t, pw_s, dw.stride, dw.padding,
                                    dw.dilation, self.depthwise_bn is not None, True)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, "
                f"depthwise_bn={self.depthwise_bn is not None}")


class FusedSeparableConv2d(nn.Module):
    """A depthwise-separable atrous conv with its BNs folded into the filters: one
    ``deeplab_fast.ops.separable_conv2d`` call (``fused_separable_conv``) per forward.

    Parameters: ``dw_weight`` [C, 1, R, S], ``dw_bias`` [C] (or None), ``pw_weight`` [K, C, 1, 1], ``pw_bias`` [K];
    settings ``stride``, ``padding``, ``dilation`` (the atrous rate; (int, int) each), ``dw_relu``, ``pw_relu``.
    Built by ``from_module``; input Tensor[N, C, H, W], output Tensor[N, K, P, Q] (channels_last when the input
    is). Its forward is differentiable (the op's autograd), but it is meant for inference: the folded parameters
    are a different parametrisation from the original's.
    """

    def __init__(self, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor], pw_weight: torch.Tensor,
                 pw_bias: Optional[torch.Tensor], stride=(1, 1), padding=(0, 0), dilation=(1, 1), dw_relu: bool = True,
                 pw_relu: bool = True):
        super().__init__()
        self.dw_weight = nn.Parameter(dw_weight)
        self.dw_bias = None if dw_bias is None else nn.Parameter(dw_bias)
        self.pw_weight = nn.Parameter(pw_weight)
        self.pw_bias = None if pw_bias is None else nn.Parameter(pw_bias)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.dw_relu, self.pw_relu = bool(dw_relu), bool(pw_relu)

    @classmethod
    def from_module(cls, module: AtrousSeparableConv2d) -> "FusedSeparableConv2d":
        """The layer computing ``module``'s eval-mode forward, BNs folded: ``dw_weight = w_d * s_d``, ``dw_bias =
        t_d``, ``pw_weight = w_p * s_p``, ``pw_bias = t_p`` (s, t: each BN's ``gamma / sqrt(var + eps)`` and
        ``beta - mean * s``, the pointwise conv's bias included; computed in float32 or better, then rounded to
        the parameters' dtype). New parameters, ``requires_grad`` as the originals'; the training flag is
        ``module``'s.

        Raises ValueError when ``module`` is not an ``AtrousSeparableConv2d`` or cannot be folded (training mode,
        or a BN without running statistics).
        """
        if not isinstance(module, AtrousSeparableConv2d):
            raise ValueError(f"FusedSeparableConv2d.from_module: module must be an AtrousSeparableConv2d, got "
                             f"{type(module).__name__}")
        if not module._folds():
            raise ValueError("FusedSeparableConv2d.from_module: module must be in eval mode with BN running "
                             "statistics (call module.eval() first)")
        dw, pw = module.depthwise, module.pointwise
        dw_s, dw_t, pw_s, pw_t = module.folded()
        needs_grad = any(p.requires_grad for p in module.parameters())
        with torch.no_grad():
            wd = dw.weight if dw_s is None else (dw.weight * dw_s.view(-1, 1, 1, 1)).to(dw.weight.dtype)
            wp = (pw.weight * pw_s.view(-1, 1, 1, 1)).to(pw.weight.dtype)
            new = cls(wd.detach().clone(), None if dw_t is None else dw_t.to(dw.weight.dtype).detach().clone(),
                      wp.detach().clone(), pw_t.to(pw.weight.dtype).detach().clone(), dw.stride, dw.padding,
                      dw.dilation, dw_relu=module.depthwise_bn is not None, pw_relu=True)
        for p in new.parameters():
            p.requires_grad_(needs_grad)
        new.training = module.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_separable_conv(x, self.dw_weight, self.dw_bias, None, self.pw_weight, self.pw_bias, None,
                                    self.stride, self.padding, self.dilation, self.dw_relu, self.pw_relu)

    def extra_repr(self) -> str:
        c, k = self.dw_weight.shape[0], self.pw_weight.shape[0]
        return (f"{c}, {k}, kernel_size={tuple(self.dw_weight.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, dw_relu={self.dw_relu}, pw_relu={self.pw_relu}")
