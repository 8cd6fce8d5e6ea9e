"""Blocks that ``deeplab_fast.optimize`` puts in place of the ones it recognises (their fused form)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .atrous import _bn_scale_shift

__all__ = ["FusedResNetBlock", "fold_grouped_conv"]


class FusedResNetBlock(nn.Module):
    """A torchvision ResNet ``Bottleneck`` / ``BasicBlock`` with its main path as a Sequential (fused):
    ``relu(body(x) + (downsample(x) if downsample is not None else x))``.

    ``body`` computes the block's ``conv1 -> bn1 -> relu -> conv2 -> bn2 [-> relu -> conv3 -> bn3]``, after
    ``optimize`` mostly ``AtrousConv2dReLU`` layers (the last one without ReLU, since the residual add comes
    before the block's last ReLU). ``kind`` names the block it replaced.
    """

    def __init__(self, body: nn.Sequential, downsample: Optional[nn.Module], relu: nn.Module,
                 kind: str = "Bottleneck"):
        super().__init__()
        self.body = body
        self.downsample = downsample
        self.relu = relu
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def fold_grouped_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` in eval mode (weight * s, bias beta + (b - mean) * s): a
    grouped conv (the MobileNets' depthwise convs) with its BN folded, which the fused op (groups 1) does not take."""
    scale, shift = _bn_scale_shift(bn, conv.bias)
    w = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    needs_grad = any(p.requires_grad for p in (w, conv.bias, bn.weight, bn.bias) if p is not None)
    with torch.no_grad():
        new.weight.copy_(w * scale.view(-1, 1, 1, 1).to(w.dtype))
        new.bias.copy_(shift.to(w.dtype))
    new.weight.requires_grad_(needs_grad)
    new.bias.requires_grad_(needs_grad)
    new.training = conv.training
    return new
