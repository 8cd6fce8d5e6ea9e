"""The mobile DeepLabs of torchvision: DeepLab v3 and Lite R-ASPP on a dilated MobileNetV3-Large, module for module
``torchvision.models.segmentation.deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large`` (torchvision
0.28), so torchvision's state dicts (``COCO_WITH_VOC_LABELS_V1``) load with ``strict=True`` and give its outputs.

Sources: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587 (the
ASPP head); Howard et al., "Searching for MobileNetV3", ICCV 2019 (the backbone and Lite R-ASPP, sec. 6.1.3);
torchvision's ``segmentation/deeplabv3.py``, ``segmentation/lraspp.py`` and ``mobilenetv3.py``, whose names these
modules keep.

Both take Tensor[N, 3, H, W] (floating point, normalised as torchvision's weights expect) and return torchvision's
``OrderedDict`` with ``"out"`` (logits Tensor[N, num_classes, H, W], bilinear with ``align_corners=False``), and for
DeepLab v3 with ``aux_loss=True`` also ``"aux"`` (the FCN head on the stride-8 feature ``backbone.4``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import positive_int
from ..nn.aspp import ASPP
from .backbones import mobilenet_v3_large_features
from .deeplab import _fcn_head, check_rgb_input

__all__ = ["DeepLabV3MobileNetV3", "LRASPP", "LRASPPHead"]

_LOW = 4    # the stride-8 block of mobilenet_v3_large (C2, 40 channels): torchvision's stage_indices[-4]
_HIGH = 16  # the last layer (C5, 960 channels, stride 16 with dilated=True)


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _run_backbone(backbone: nn.Sequential, x: torch.Tensor):
    """(the stride-8 feature, the last feature)."""
    low = None
    for i, layer in enumerate(backbone):
        x = layer(x)
        if i == _LOW:
            low = x
    return low, x


class DeepLabV3MobileNetV3(nn.Module):
    """torchvision's ``deeplabv3_mobilenet_v3_large``: dilated MobileNetV3-Large (output stride 16) + DeepLabHead
    (``deeplab_fast.nn.ASPP(960, (12, 24, 36))``, 3x3 conv 256 + BN + ReLU, 1x1 conv to the classes).

    Args:
        num_classes (int): default 21. aux_loss (bool): the FCN head on ``backbone.4`` (40 channels). Default False.

    Modules: ``backbone`` (``nn.Sequential``, keys ``backbone.0`` .. ``backbone.16`` as torchvision's
    IntermediateLayerGetter), ``classifier``, ``aux_classifier`` (or None). ``forward_logits(x)``: the main
    head's scores at stride 16. Raises ValueError on bad arguments and input.
    """

    output_stride = 16

    def __init__(self, num_classes: int = 21, aux_loss: bool = False):
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes", "DeepLabV3MobileNetV3")
        self.arch = "deeplab_v3_mobilenet_v3_large"
        self.aux_loss = bool(aux_loss)
        self.backbone = mobilenet_v3_large_features(dilated=True)
        self.classifier = nn.Sequential(ASPP(960, (12, 24, 36)), nn.Conv2d(256, 256, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(256), nn.ReLU(), nn.Conv2d(256, self.num_classes, 1))
        self.aux_classifier = _fcn_head(40, self.num_classes) if self.aux_loss else None

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        check_rgb_input(x, "DeepLabV3MobileNetV3")
        return self.classifier(self.backbone(x))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        check_rgb_input(x, "DeepLabV3MobileNetV3")
        low, high = _run_backbone(self.backbone, x)
        result = OrderedDict([("out", _upsample(self.classifier(high), x.shape[-2:]))])
        if self.aux_classifier is not None:
            result["aux"] = _upsample(self.aux_classifier(low), x.shape[-2:])
        return result


class LRASPPHead(nn.Module):
    """torchvision's ``LRASPPHead`` (Howard et al. 2019, sec. 6.1.3): ``cbr`` (1x1 conv to 128 + BN + ReLU) on
    the high feature, gated by ``scale`` (mean, 1x1 conv, sigmoid), resized (bilinear) to the low feature, then
    ``low_classifier(low) + high_classifier(high)``. The pool is a mean over H, W (``scale.0`` kept for the key
    layout)."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128):
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU(inplace=True))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        s = self.scale[2](self.scale[1](high.mean(dim=(2, 3), keepdim=True)))
        y = _upsample(self.cbr(high) * s, low.shape[-2:])
        return self.low_classifier(low) + self.high_classifier(y)


class LRASPP(nn.Module):
    """torchvision's ``lraspp_mobilenet_v3_large``: dilated MobileNetV3-Large + ``LRASPPHead`` on
    ``backbone.4`` (low, 40 channels, stride 8) and ``backbone.16`` (high, 960 channels, stride 16).

    Args: num_classes (int), default 21. Modules: ``backbone`` (keys ``backbone.0`` .. ``backbone.16``),
    ``classifier`` (``LRASPPHead``). No auxiliary head (``aux_loss=True``: ValueError, as torchvision refuses
    it). ``forward_logits(x)``: the scores at stride 8.
    """

    output_stride = 8

    def __init__(self, num_classes: int = 21, aux_loss: bool = False):
        super().__init__()
        if aux_loss:
            raise ValueError("LRASPP: this model has no auxiliary head (aux_loss must be False)")
        self.num_classes = positive_int(num_classes, "num_classes", "LRASPP")
        self.arch = "lraspp_mobilenet_v3_large"
        self.backbone = mobilenet_v3_large_features(dilated=True)
        self.classifier = LRASPPHead(40, 960, self.num_classes)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        check_rgb_input(x, "LRASPP")
        return self.classifier(*_run_backbone(self.backbone, x))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("out", _upsample(self.forward_logits(x), x.shape[-2:]))])
