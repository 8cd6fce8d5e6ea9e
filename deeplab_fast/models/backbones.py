"""Backbones of the DeepLab models: ResNet-50/101, VGG-16, MobileNetV2 and MobileNetV3-Large, with torchvision's
parameter names.

``ResNet`` (``resnet50``, ``resnet101``) has torchvision's module tree and state-dict layout (``conv1``, ``bn1``,
``relu``, ``maxpool``, ``layer1``..``layer4`` of ``Bottleneck`` blocks with ``conv1/bn1/conv2/bn2/conv3/bn3`` and
``downsample.0/.1``, then ``avgpool``/``fc``), so ``torchvision.models.resnet101().state_dict()`` loads with
``strict=True``. ``include_top=False`` drops ``avgpool``/``fc``, as torchvision's ``IntermediateLayerGetter`` does
inside its segmentation models, so a DeepLab model's ``backbone.*`` keys match torchvision's.

``vgg16_features`` is torchvision's ``vgg16().features`` (same indices, so ``features.{i}.weight`` keys match), or
with ``deeplab=True`` the DeepLab-LargeFOV variant: its pools and dilated conv5 (stateless changes).

Nothing here imports torchvision.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from .._validation import positive_int

__all__ = ["Bottleneck", "ResNet", "resnet50", "resnet101", "vgg16_features", "VGG16_CONV_INDICES",
           "VGG16_POOL_INDICES", "MobileNetV2", "InvertedResidual", "InvertedResidualV3", "SqueezeExcitation",
           "ConvBNActivation", "mobilenet_v3_large_features", "make_divisible"]

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# torchvision's vgg16().features: the convs (each followed by an in-place ReLU) and the five max-pools.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOL_INDICES = (4, 9, 16, 23, 30)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand by 4, residual, ReLU), same names.

    ``stride_in_1x1=False`` puts the stride on the 3x3 conv (torchvision, "ResNet v1.5");
    ``True`` on the first 1x1 conv (the original MSRA/Caffe ResNet, which DeepLab v2's Caffe weights use).
    The 3x3 conv has ``padding = dilation``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, stride_in_1x1: bool = False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A bottleneck ResNet with torchvision's names, dilation options and multi-grid.

    Args:
        layers (4 ints): blocks per stage, (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
        num_classes (int): outputs of ``fc`` (with ``include_top``). Default 1000.
        replace_stride_with_dilation (3 bools): for layer2..layer4, replace the stage's stride 2 by dilation
            (torchvision's argument). Output stride: 32, halved for every True.
        multi_grid (ints or None): the DeepLab-v3 multi-grid (Chen et al. 2017, sec. 3.2) for layer4, one unit
            rate per block: block i of layer4 gets dilation ``d4 * multi_grid[i]``, with ``d4`` layer4's dilation
            (1, 2 or 4), the first block included. None (default): torchvision's rule, below.
        full_dilation (bool): every block of a dilated stage at the stage's dilation, the first included (the
            official DeepLab TensorFlow code's and segmentation_models_pytorch's rule), instead of torchvision's
            (the first block at the previous stage's dilation). Default False. Ignored for layer4 when
            ``multi_grid`` is given.
        style ("torchvision" or "caffe"):
            - "torchvision" (default): exactly ``torchvision.models.resnet``: stride on the 3x3 conv; in a dilated
              stage the first block keeps the previous stage's dilation and the others use the new one; stem
              max-pool 3/2/1 in floor mode.
            - "caffe": the MSRA ResNet of DeepLab v2's Caffe model, as kazuto1011/deeplab-pytorch restates it:
              stride on the first 1x1 conv, every block of a dilated stage at the stage's dilation, stem max-pool
              3/2/1 in ceil mode. Same parameters and key names; only strides, dilations and pooling differ.
        include_top (bool): keep ``avgpool`` and ``fc`` (default True). False: the feature extractor only.

    ``forward(x)`` returns the ``fc`` logits (``include_top``) or layer4's features; ``forward_features(x)``
    returns an OrderedDict of the four stages' outputs ("layer1".."layer4"). ``output_stride`` (int) is the
    stride of layer4's output. Weights are initialised as torchvision's (Kaiming-normal fan-out convs, BN 1/0).
    Raises ValueError on bad arguments.
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 multi_grid: Optional[Sequence[int]] = None, style: str = "torchvision", include_top: bool = True,
                 full_dilation: bool = False):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet: layers must be 4 block counts, got {layers!r}")
        layers = tuple(positive_int(n, "each block count", "ResNet") for n in layers)
        if (isinstance(replace_stride_with_dilation, (str, bytes))
                or len(replace_stride_with_dilation) != 3
                or not all(isinstance(b, (bool, int)) and b in (0, 1) for b in replace_stride_with_dilation)):
            raise ValueError("ResNet: replace_stride_with_dilation must be 3 bools (layer2, layer3, layer4), got "
                             f"{replace_stride_with_dilation!r}")
        if style not in ("torchvision", "caffe"):
            raise ValueError(f"ResNet: style must be 'torchvision' or 'caffe', got {style!r}")
        if multi_grid is not None:
            if isinstance(multi_grid, (str, bytes)) or not isinstance(multi_grid, Sequence):
                raise ValueError(f"ResNet: multi_grid must be None or {layers[3]} positive ints, got {multi_grid!r}")
            multi_grid = tuple(positive_int(g, "each multi_grid rate", "ResNet") for g in multi_grid)
            if len(multi_grid) != layers[3]:
                raise ValueError(f"ResNet: multi_grid needs one rate per layer4 block ({layers[3]}), got "
                                 f"{len(multi_grid)}: {multi_grid}")
        self.layers = layers
        self.style = style
        self.full_dilation = bool(full_dilation)
        self.multi_grid = multi_grid
        self.replace_stride_with_dilation = tuple(bool(b) for b in replace_stride_with_dilation)
        self.inplanes = 64
        self.dilation = 1
        caffe = style == "caffe"
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=caffe)
        rd = self.replace_stride_with_dilation
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=rd[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=rd[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=rd[2], multi_grid=multi_grid)
        self.output_stride = 4 * 2 ** sum(1 for d in rd if not d)
        self.include_top = bool(include_top)
        if self.include_top:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, positive_int(num_classes, "num_classes", "ResNet"))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    multi_grid: Optional[Sequence[int]] = None) -> nn.Sequential:
        caffe = self.style == "caffe"
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        if multi_grid is not None:
            dilations = [self.dilation * g for g in multi_grid]
        else:
            first = self.dilation if caffe or self.full_dilation else previous_dilation
            dilations = [first] + [self.dilation] * (blocks - 1)
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, dilations[0], stride_in_1x1=caffe)]
        self.inplanes = planes * Bottleneck.expansion
        for i in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, dilation=dilations[i], stride_in_1x1=caffe))
        return nn.Sequential(*layers)

    def block_dilations(self) -> dict:
        """{"layer1": (d, ...), ..., "layer4": (...)}: every block's 3x3 dilation."""
        return {f"layer{i}": tuple(int(b.conv2.dilation[0]) for b in getattr(self, f"layer{i}"))
                for i in range(1, 5)}

    def forward_features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out[f"layer{i}"] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["layer4"]
        if not self.include_top:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(depth: int, replace_stride_with_dilation, multi_grid, **kwargs) -> ResNet:
    return ResNet(RESNET_LAYERS[depth], replace_stride_with_dilation=replace_stride_with_dilation,
                  multi_grid=multi_grid, **kwargs)


def resnet50(replace_stride_with_dilation: Sequence[bool] = (False, False, False),
             multi_grid: Optional[Sequence[int]] = None, **kwargs) -> ResNet:
    """ResNet-50 (``torchvision.models.resnet50`` names and layout). kwargs: ``ResNet``'s ``num_classes``,
    ``style``, ``include_top``."""
    return _resnet(50, replace_stride_with_dilation, multi_grid, **kwargs)


def resnet101(replace_stride_with_dilation: Sequence[bool] = (False, False, False),
              multi_grid: Optional[Sequence[int]] = None, **kwargs) -> ResNet:
    """ResNet-101 (``torchvision.models.resnet101`` names and layout). kwargs: ``ResNet``'s ``num_classes``,
    ``style``, ``include_top``."""
    return _resnet(101, replace_stride_with_dilation, multi_grid, **kwargs)


def vgg16_features(deeplab: bool = False, width_divisor: int = 1) -> nn.Sequential:
    """VGG-16's convolutional part, index for index ``torchvision.models.vgg16().features``.

    Convs (3x3, pad 1, bias, in-place ReLU after each) at indices ``VGG16_CONV_INDICES``; pools at
    ``VGG16_POOL_INDICES`` (4, 9, 16, 23, 30). With ``deeplab=False`` the pools are torchvision's
    ``MaxPool2d(2, 2)``. With ``deeplab=True`` the DeepLab-LargeFOV variant (Chen et al., ICLR 2015; its
    Caffe definition): pool1..pool3 max 3x3 stride 2 pad 1, pool4 and pool5 max 3x3 stride 1 pad 1, and conv5_1..5_3
    (indices 24, 26, 28) at dilation 2 with pad 2: output stride 8.

    The DeepLab pools run in floor mode (PyTorch's default). Caffe pools in ceil mode; the two agree when
    H and W are of the form 8k + 1 (DeepLab's 321 and 513 crops: 513 -> 257 -> 129 -> 65), and floor mode keeps
    the 1/8 grid aligned with a stride-8 conv on the image at every size (see ``DeepLabV1``).
    The layers are stateless changes, so the state dict is torchvision's either way.

    ``width_divisor`` (positive int, default 1) divides every conv's output channels (``max(1, c // d)``): a
    narrow VGG for quick experiments and tests; its weights are not torchvision's. 1 is VGG-16 itself.
    """
    d_width = positive_int(width_divisor, "width_divisor", "vgg16_features")
    layers = []
    in_ch = 3
    pool = 0
    for v in _VGG16_CFG:
        if v == "M":
            pool += 1
            if not deeplab:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.MaxPool2d(3, stride=2 if pool <= 3 else 1, padding=1))
        else:
            d = 2 if deeplab and pool == 4 else 1
            out_ch = max(1, v // d_width)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            in_ch = out_ch
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return features


# ----------------------------------------------------------------------------------------------------------
# MobileNetV2 and MobileNetV3-Large (Sandler et al., CVPR 2018; Howard et al., ICCV 2019), with
# torchvision.models.mobilenetv2 / mobilenetv3's module tree and names, so that torchvision's ImageNet weights
# (and the segmentation models built on them) load by name.


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
