"""The DeepLab model family (v1 LargeFOV / MSc-LargeFOV, v2 ResNet-101 ASPP, v3 ResNet-50/101), its backbones and
weight loading. No runtime dependency on torchvision (torchvision's weights load by name).

Every model takes ``num_classes``, checks its input (Tensor[N, 3, H, W], floating point; else ValueError),
exposes ``output_stride`` (int) and ``forward_logits(x)`` (scores at 1/output_stride), and returns logits at the
input resolution (bilinear, ``align_corners=False``); DeepLab v3 with ``aux_loss=True`` returns
``{"out", "aux"}`` as torchvision, DeepLab v2 with ``msc=True`` in training mode the per-scale list.

``MODELS`` maps the names below to their builders; ``get_model(name, **kwargs)`` builds one.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .backbones import (VGG16_CONV_INDICES, VGG16_POOL_INDICES, Bottleneck, ResNet, resnet50, resnet101,
                        vgg16_features)
from .deeplab import (DeepLabV1, DeepLabV2, DeepLabV3, check_rgb_input, deeplab_v1_largefov,
                      deeplab_v1_msc_largefov, deeplab_v2_resnet101, deeplab_v3_resnet50, deeplab_v3_resnet101)
from .weights import (convert_kazuto_deeplabv2, from_torchvision, is_kazuto_deeplabv2, load_checkpoint,
                      load_torchvision_deeplabv3, load_vgg16_features, load_weights, to_kazuto_deeplabv2)

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "deeplab_v1_largefov": deeplab_v1_largefov,
    "deeplab_v1_msc_largefov": deeplab_v1_msc_largefov,
    "deeplab_v2_resnet101": deeplab_v2_resnet101,
    "deeplab_v3_resnet50": deeplab_v3_resnet50,
    "deeplab_v3_resnet101": deeplab_v3_resnet101,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """``MODELS[name](**kwargs)``; ValueError listing the valid names for an unknown one."""
    builder = MODELS.get(name) if isinstance(name, str) else None
    if builder is None:
        raise ValueError(f"get_model: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return builder(**kwargs)


__all__ = [
    "MODELS", "get_model",
    "deeplab_v1_largefov", "deeplab_v1_msc_largefov", "deeplab_v2_resnet101", "deeplab_v3_resnet50",
    "deeplab_v3_resnet101", "DeepLabV1", "DeepLabV2", "DeepLabV3", "check_rgb_input",
    "ResNet", "Bottleneck", "resnet50", "resnet101", "vgg16_features", "VGG16_CONV_INDICES", "VGG16_POOL_INDICES",
    "load_checkpoint", "load_weights", "load_torchvision_deeplabv3", "from_torchvision", "load_vgg16_features",
    "convert_kazuto_deeplabv2", "to_kazuto_deeplabv2", "is_kazuto_deeplabv2",
]
