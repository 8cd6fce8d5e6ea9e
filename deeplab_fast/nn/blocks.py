"""Blocks that ``deeplab_fast.optimize`` puts in place of the ones it recognises (their fused form)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["FusedResNetBlock"]


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
