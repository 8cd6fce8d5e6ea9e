"""Backbones of the DeepLab models: ResNet-50/101 and VGG-16, with torchvision's parameter names (the MobileNets:
``mobilenet.py``).

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
