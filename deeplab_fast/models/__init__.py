"""The DeepLab model family (v1 LargeFOV / MSc-LargeFOV, v2 ResNet-101 ASPP, v3 ResNet-50/101, v3+ ResNet-50/101
and MobileNetV2, torchvision's mobile DeepLab v3 and Lite R-ASPP on MobileNetV3-Large), its backbones, a registry
with weights by name in ``torchvision.models``' conventions, weight loading and the inference preprocessing. No
runtime dependency on torchvision.

Every model takes ``num_classes``, checks its input (Tensor[N, 3, H, W], floating point; else ValueError),
exposes ``output_stride`` (int) and ``forward_logits(x)`` (the main head's scores before the final resize), and
returns logits at the input resolution: v1 and v2 as a Tensor (v2 with ``msc=True`` in training mode the
per-scale list), the v3 / v3+ / mobile models as torchvision's segmentation models do, an ``OrderedDict`` with
``"out"`` (and ``"aux"`` with ``aux_loss=True``). The public builders (``deeplab_v3_resnet50(*, weights=None,
progress=True, num_classes=None, aux_loss=None, weights_backbone=None, **kwargs)``, ...) take torchvision's
keyword arguments; ``deeplabv3_resnet50``, ``deeplabv3_resnet101``, ``deeplabv3_mobilenet_v3_large`` and
``lraspp_mobilenet_v3_large`` are also importable under torchvision's names.

- ``list_models()``, ``get_model(name, *, weights=None, **kwargs)``, ``get_model_weights(name)``,
  ``get_weight("Enum.MEMBER")`` (``_api.py``; the entries are in ``zoo.py``). ``MODELS`` maps the names to
  their builders.
- ``weights.transforms()`` / ``SegmentationPreset(mode)``: the input normalisation the weights expect.
- ``load_checkpoint``, ``load_weights`` and the key maps (``weights.py``).
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from ._api import (ModelEntry, Weights, WeightsEnum, build_model, get_model, get_model_builder, get_model_weights,
                   get_weight, list_models, load_weights_state_dict, model_entry, preprocess, register_model,
                   resolve_backbone_weights, resolve_weights)
from .backbones import (VGG16_CONV_INDICES, VGG16_POOL_INDICES, Bottleneck, MobileNetV2, ResNet,
                        mobilenet_v3_large_features, resnet50, resnet101, vgg16_features)
from .deeplab import DeepLabV1, DeepLabV2, DeepLabV3, check_rgb_input
from .deeplabv3plus import DeepLabV3Plus
from .mobile import LRASPP, DeepLabV3MobileNetV3
from .transforms import SegmentationPreset
from .weights import (CheckpointError, as_state_dict, convert_kazuto_deeplabv2, convert_smp_deeplabv3plus,
                      from_torchvision, is_kazuto_deeplabv2, is_smp_deeplabv3plus, load_checkpoint,
                      load_torchvision_deeplabv3, load_vgg16_features, load_weights, resnet_to_deeplab_backbone,
                      to_kazuto_deeplabv2, vgg16_to_deeplab_v1)
from .zoo import (COCO_STUFF_CLASSES, DeepLabV1_LargeFOV_Weights, DeepLabV1_MSC_LargeFOV_Weights,
                  DeepLabV2_ResNet101_Weights, DeepLabV3_MobileNet_V3_Large_Weights, DeepLabV3_ResNet50_Weights,
                  DeepLabV3_ResNet101_Weights, DeepLabV3Plus_MobileNet_V2_Weights, DeepLabV3Plus_ResNet50_Weights,
                  DeepLabV3Plus_ResNet101_Weights, LRASPP_MobileNet_V3_Large_Weights, deeplab_v1_largefov,
                  deeplab_v1_msc_largefov, deeplab_v2_resnet101, deeplab_v3_mobilenet_v3_large, deeplab_v3_resnet50,
                  deeplab_v3_resnet101, deeplab_v3plus_mobilenet_v2, deeplab_v3plus_resnet50,
                  deeplab_v3plus_resnet101, deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101,
                  lraspp_mobilenet_v3_large)

MODELS: Dict[str, Callable[..., nn.Module]] = {name: get_model_builder(name) for name in list_models()}

__all__ = [
    "MODELS", "get_model", "build_model", "get_model_weights", "get_weight", "list_models", "get_model_builder", "model_entry",
    "register_model", "resolve_weights", "load_weights_state_dict", "Weights", "WeightsEnum", "ModelEntry",
    "DeepLabV1_LargeFOV_Weights", "DeepLabV1_MSC_LargeFOV_Weights", "DeepLabV2_ResNet101_Weights",
    "DeepLabV3_ResNet50_Weights", "DeepLabV3_ResNet101_Weights", "COCO_STUFF_CLASSES",
    "DeepLabV3_MobileNet_V3_Large_Weights", "LRASPP_MobileNet_V3_Large_Weights", "DeepLabV3Plus_ResNet50_Weights",
    "DeepLabV3Plus_ResNet101_Weights", "DeepLabV3Plus_MobileNet_V2_Weights", "resolve_backbone_weights",
    "deeplab_v3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "deeplab_v3plus_resnet50",
    "deeplab_v3plus_resnet101", "deeplab_v3plus_mobilenet_v2", "DeepLabV3Plus", "DeepLabV3MobileNetV3", "LRASPP",
    "MobileNetV2", "mobilenet_v3_large_features", "convert_smp_deeplabv3plus", "is_smp_deeplabv3plus",
    "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
    "SegmentationPreset", "preprocess",
    "deeplab_v1_largefov", "deeplab_v1_msc_largefov", "deeplab_v2_resnet101", "deeplab_v3_resnet50",
    "deeplab_v3_resnet101", "DeepLabV1", "DeepLabV2", "DeepLabV3", "check_rgb_input",
    "ResNet", "Bottleneck", "resnet50", "resnet101", "vgg16_features", "VGG16_CONV_INDICES", "VGG16_POOL_INDICES",
    "CheckpointError", "load_checkpoint", "as_state_dict", "load_weights", "load_torchvision_deeplabv3", "from_torchvision",
    "load_vgg16_features", "convert_kazuto_deeplabv2", "to_kazuto_deeplabv2", "is_kazuto_deeplabv2",
    "vgg16_to_deeplab_v1", "resnet_to_deeplab_backbone",
]
