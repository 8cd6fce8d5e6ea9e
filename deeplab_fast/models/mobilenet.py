"""The MobileNet backbones of the mobile DeepLabs: MobileNetV2 (Sandler et al., CVPR 2018) and MobileNetV3-Large
(Howard et al., ICCV 2019), with torchvision.models.mobilenetv2 / mobilenetv3's module tree and parameter names,
so that torchvision's ImageNet weights (and the segmentation models built on them) load by name.

Nothing here imports torchvision.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

def make_divisible(v: float, divisor: int = 8) -> int:
    """The channel rounding of the MobileNets (TensorFlow's ``_make_divisible``, as torchvision writes it): the
    nearest multiple of ``divisor`` at least ``divisor``, not below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNActivation(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + activation: torchvision's ``Conv2dNormActivation`` (children 0, 1, 2),
    padding ``(kernel_size - 1) // 2 * dilation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1, activation=nn.ReLU, bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 * dilation,
                            dilation=dilation, groups=groups, bias=False),
                  nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """MobileNetV2's block (torchvision's names): ``conv`` = [1x1 expand + BN + ReLU6] (expand_ratio != 1),
    3x3 depthwise (stride, dilation) + BN + ReLU6, 1x1 project (``nn.Conv2d``) + BN; plus the input when
    stride 1 and the channel count is kept. ``stride`` is the configured stride (2 for a stage's first block,
    whether or not dilation replaced it: torchvision's and smp's ``use_res_connect`` rule)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1,
                 dilated_stride: Optional[int] = None):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(inp, hidden, 1, activation=nn.ReLU6))
        conv_stride = stride if dilated_stride is None else dilated_stride
        layers += [ConvBNActivation(hidden, hidden, 3, conv_stride, groups=hidden, dilation=dilation,
                                    activation=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# t (expand ratio), c (channels), n (blocks), s (stride of the first block): torchvision's / the paper's table 2.
_MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1))


def _dilation_plan(strides: Sequence[int], output_stride: int, rule: str, start_stride: int = 2):
    """(conv stride, dilation) per layer for the configured ``strides``, once the running stride reaches
    ``output_stride`` stride 2 becomes dilation. rule "full": the layer that would stride takes the new
    dilation (smp's ``replace_strides_with_dilation``, torchvision's MobileNetV3); "tf": it keeps the previous
    one, the following layers take the new (the official DeepLab TensorFlow code's MobileNet rule)."""
    current, rate, plan = start_stride, 1, []
    for s in strides:
        if current >= output_stride:
            if rule == "full":
                rate *= s
                plan.append((1, rate))
            else:
                plan.append((1, rate))
                rate *= s
        else:
            current *= s
            plan.append((s, rate))
    return plan


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) as a feature extractor with torchvision's ``features`` (keys ``features.{i}.*``,
    i = 0..18: the stem, 17 inverted residual blocks, the 1x1 conv to 1280), so
    ``torchvision.models.mobilenet_v2().state_dict()`` loads (its ``classifier`` aside).

    Args:
        output_stride (8, 16 or 32): the stride of the last feature; below 32 the later stages' strides become
            dilations following ``dilation_rule``. Default 32.
        dilation_rule ("full" or "tf"): see ``_dilation_plan``: "full" (segmentation_models_pytorch's
            ``make_dilated``: every conv of a dilated stage at its dilation) or "tf" (the official DeepLab
            TensorFlow code: the block that would stride keeps the previous dilation).
        last_conv (bool): keep ``features.18`` (1x1 conv to 1280 + BN + ReLU6). Default True. The official
            DeepLab code ends at ``layer_18`` (features.17, 320 channels).

    BN: ``nn.BatchNorm2d`` defaults (eps 1e-5), as torchvision's. ``forward(x)`` returns the last feature.
    """

    def __init__(self, output_stride: int = 32, dilation_rule: str = "full", last_conv: bool = True):
        super().__init__()
        if isinstance(output_stride, bool) or output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV2: output_stride must be 8, 16 or 32, got {output_stride!r}")
        if dilation_rule not in ("full", "tf"):
            raise ValueError(f"MobileNetV2: dilation_rule must be 'full' or 'tf', got {dilation_rule!r}")
        self.output_stride = int(output_stride)
        blocks = [(t, c, s if i == 0 else 1) for t, c, n, s in _MOBILENET_V2_CFG for i in range(n)]
        plan = _dilation_plan([s for _, _, s in blocks], output_stride, dilation_rule)
        layers = [ConvBNActivation(3, 32, 3, 2, activation=nn.ReLU6)]
        inp = 32
        for (t, c, s), (conv_stride, dilation) in zip(blocks, plan):
            layers.append(InvertedResidual(inp, c, s, t, dilation=dilation, dilated_stride=conv_stride))
            inp = c
        if last_conv:
            layers.append(ConvBNActivation(inp, 1280, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.out_channels = 1280 if last_conv else inp
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` as MobileNetV3 uses it: ``x * hardsigmoid(fc2(relu(fc1(mean(x)))))``
    (1x1 convs with bias; names ``avgpool``, ``fc1``, ``fc2``, ``activation``, ``scale_activation``). The
    pool is a mean over H, W (what the kept ``avgpool`` computes; it exports as ReduceMean)."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.scale_activation(self.fc2(self.activation(self.fc1(s))))
        return s * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3's block (torchvision's names): ``block`` = [1x1 expand + BN + act] (when the width
    changes), k x k depthwise + BN + act, [squeeze-excitation], 1x1 project + BN; plus the input when stride 1
    and the width is kept (the configured stride: a dilated first block has none, as torchvision)."""

    def __init__(self, inp: int, kernel: int, expanded: int, out: int, use_se: bool, activation, stride: int,
                 dilation: int, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == out
        norm = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        layers = []
        if expanded != inp:
            layers.append(ConvBNActivation(inp, expanded, 1, activation=activation, **norm))
        layers.append(ConvBNActivation(expanded, expanded, kernel, 1 if dilation > 1 else stride, groups=expanded,
                                       dilation=dilation, activation=activation, **norm))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(ConvBNActivation(expanded, out, 1, activation=None, **norm))
        self.block = nn.Sequential(*layers)
        self.out_channels = out
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


# input, kernel, expanded, out, SE, activation ("RE" ReLU, "HS" hard-swish), stride, dilated: torchvision's
# mobilenet_v3_large table (Howard et al. 2019, table 1); "dilated" marks the C4 stage that dilated=True dilates.
_MOBILENET_V3_LARGE_CFG = (
    (16, 3, 16, 16, False, "RE", 1, False), (16, 3, 64, 24, False, "RE", 2, False),
    (24, 3, 72, 24, False, "RE", 1, False), (24, 5, 72, 40, True, "RE", 2, False),
    (40, 5, 120, 40, True, "RE", 1, False), (40, 5, 120, 40, True, "RE", 1, False),
    (40, 3, 240, 80, False, "HS", 2, False), (80, 3, 200, 80, False, "HS", 1, False),
    (80, 3, 184, 80, False, "HS", 1, False), (80, 3, 184, 80, False, "HS", 1, False),
    (80, 3, 480, 112, True, "HS", 1, False), (112, 3, 672, 112, True, "HS", 1, False),
    (112, 5, 672, 160, True, "HS", 2, True), (160, 5, 960, 160, True, "HS", 1, True),
    (160, 5, 960, 160, True, "HS", 1, True),
)


def mobilenet_v3_large_features(dilated: bool = False) -> nn.Sequential:
    """torchvision's ``mobilenet_v3_large(dilated=dilated).features`` (width 1.0, BN eps 0.001 and momentum
    0.01): indices 0 (stem: 3x3/2 conv to 16 + hard-swish) .. 15 (the inverted residual blocks) and 16 (1x1 conv
    to 960 + hard-swish). ``dilated=True``: the last stage (blocks 13..15) at dilation 2 instead of stride 2,
    output stride 16. The strided blocks (2, 4, 7, 13: C1..C4) carry ``_is_cn``, as torchvision's."""
    norm = {"bn_eps": 0.001, "bn_momentum": 0.01}
    layers = [ConvBNActivation(3, 16, 3, 2, activation=nn.Hardswish, **norm)]
    for inp, k, exp, out, se, act, stride, dil in _MOBILENET_V3_LARGE_CFG:
        layers.append(InvertedResidualV3(inp, k, exp, out, se, nn.Hardswish if act == "HS" else nn.ReLU, stride,
                                         2 if dilated and dil else 1, **norm))
    layers.append(ConvBNActivation(160, 960, 1, activation=nn.Hardswish, **norm))
    features = nn.Sequential(*layers)
    for m in features.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features
