"""The registered models and their weights: data, read by ``get_model`` / ``get_model_weights`` /
``list_models`` (``deeplab_fast.models._api``).

Sources:
- torchvision's DeepLabV3 ResNet-50/101 weights (COCO train2017, the 20 VOC categories + background) and the
  ImageNet backbones it starts from: ``torchvision.models.segmentation.DeepLabV3_ResNet*_Weights``,
  ``ResNet*_Weights.IMAGENET1K_V1``, ``VGG16_Weights.IMAGENET1K_V1`` (BSD-3-Clause).
- kazuto1011/deeplab-pytorch's DeepLab-v2 checkpoints (MIT): the authors' Caffe ``train2_iter_20000`` model
  converted (VOC 2012 trainaug), and the COCO-Stuff 10k / 164k models trained in PyTorch; their file names carry
  no sha256 prefix, so they are downloaded without a hash check. The COCO-initialised ResNet-101 that the v2
  recipe starts from is not released as a file: kazuto1011's ``convert.py --dataset coco`` makes it from the
  authors' ``init.caffemodel``.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Mapping

from ._api import Weights, WeightsEnum, register_model
from ._meta import COCO_STUFF_CLASSES, VOC_CLASSES
from .deeplab import (deeplab_v1_largefov, deeplab_v1_msc_largefov, deeplab_v2_resnet101, deeplab_v3_resnet50,
                      deeplab_v3_resnet101)
from .transforms import SegmentationPreset, normalization_meta
from .weights import convert_kazuto_deeplabv2, resnet_to_deeplab_backbone, vgg16_to_deeplab_v1

__all__ = ["DeepLabV1_LargeFOV_Weights", "DeepLabV1_MSC_LargeFOV_Weights", "DeepLabV2_ResNet101_Weights",
           "DeepLabV3_ResNet50_Weights", "DeepLabV3_ResNet101_Weights"]

_TV = "https://download.pytorch.org/models/"
_KAZUTO = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
_TV_RECIPE = "https://github.com/pytorch/vision/tree/main/references/segmentation#deeplabv3_resnet101"
_KAZUTO_REPO = "https://github.com/kazuto1011/deeplab-pytorch"


def _weights(url, preprocessing: str, *, categories=None, source: str, recipe=None, **kw) -> Weights:
    meta = dict(kw.pop("meta", {}))
    meta.update(num_classes=len(categories) if categories else None, categories=categories,
                normalization=normalization_meta(preprocessing), source=source, recipe=recipe)
    return Weights(url=url, transforms=partial(SegmentationPreset, preprocessing), meta=meta, **kw)


def _tv_deeplabv3(depth: int, file_hash: str, miou: float, pixel_acc: float) -> Weights:
    return _weights(f"{_TV}deeplabv3_resnet{depth}_coco-{file_hash}.pth", "torchvision", categories=VOC_CLASSES,
                    source=f"torchvision DeepLabV3_ResNet{depth}_Weights.COCO_WITH_VOC_LABELS_V1",
                    recipe=_TV_RECIPE, model_kwargs={"num_classes": len(VOC_CLASSES), "aux_loss": True},
                    meta={"metrics": {"COCO-val2017-VOC-labels": {"miou": miou, "pixel_acc": pixel_acc}},
                          "notes": "trained on the COCO train2017 images of the 20 VOC categories; the auxiliary "
                                   "head (aux_classifier) is included, so get_model builds aux_loss=True"})


def _imagenet(url: str, source: str, converter) -> Weights:
    return _weights(url, "torchvision", source=source, backbone_only=True, converter=converter,
                    recipe="https://github.com/pytorch/vision/tree/main/references/classification",
                    meta={"notes": "ImageNet-1k classifier weights for the backbone only (--init of the "
                                   "recipes); the rest of the model keeps its initialisation"})


def _kazuto(file: str, categories, source: str, notes: str) -> Weights:
    return _weights(f"{_KAZUTO}{file}", "caffe", categories=categories, source=source, recipe=_KAZUTO_REPO,
                    converter=convert_kazuto_deeplabv2, check_hash=False,
                    model_kwargs={"num_classes": len(categories)},
                    meta={"sha256": None, "notes": notes + "; the file name has no sha256 prefix, so the download "
                                                           "is not hash-checked"})


def kazuto_coco_init_to_deeplab_v2(state_dict: Mapping) -> "OrderedDict":
    """kazuto1011's ``deeplabv1_resnet101-coco.pth`` (the COCO-trained ResNet-101 with a 1x1 ``fc`` classifier)
    -> ``DeepLabV2``'s ``backbone.*`` entries (the classifier dropped)."""
    return convert_kazuto_deeplabv2(OrderedDict((k, v) for k, v in state_dict.items()
                                                if not k.split(".", 1)[-1].startswith("fc.")
                                                and not k.startswith("fc.")))


_VGG16 = _imagenet(f"{_TV}vgg16-397923af.pth", "torchvision VGG16_Weights.IMAGENET1K_V1", vgg16_to_deeplab_v1)


class DeepLabV1_LargeFOV_Weights(WeightsEnum):
    IMAGENET1K_VGG16_BACKBONE = _VGG16


class DeepLabV1_MSC_LargeFOV_Weights(WeightsEnum):
    IMAGENET1K_VGG16_BACKBONE = _VGG16


class DeepLabV2_ResNet101_Weights(WeightsEnum):
    VOC_AUG_CAFFE_V1 = _kazuto(
        "deeplabv2_resnet101_msc-vocaug-20000.pth", VOC_CLASSES,
        "kazuto1011/deeplab-pytorch, converted from the DeepLab authors' Caffe train2_iter_20000.caffemodel",
        "VOC 2012 trainaug, MSC training; 76.65 mIoU on val without the CRF, 77.93 with it (kazuto1011's README)")
    COCO_STUFF164K_V1 = _kazuto(
        "deeplabv2_resnet101_msc-cocostuff164k-100000.pth", COCO_STUFF_CLASSES,
        "kazuto1011/deeplab-pytorch, trained in PyTorch", "COCO-Stuff 164k train, 100k iterations; 39.1 mIoU on val")
    COCO_STUFF10K_V1 = _kazuto(
        "deeplabv2_resnet101_msc-cocostuff10k-20000.pth", COCO_STUFF_CLASSES,
        "kazuto1011/deeplab-pytorch, trained in PyTorch", "COCO-Stuff 10k train, 20k iterations; 34.8 mIoU on val")
    COCO_INIT_CAFFE = _weights(
        None, "caffe", source="the DeepLab authors' init.caffemodel (ResNet-101 trained on MS-COCO), converted by "
                              "kazuto1011/deeplab-pytorch", recipe=_KAZUTO_REPO, backbone_only=True,
        converter=kazuto_coco_init_to_deeplab_v2, check_hash=False, file_name="deeplabv1_resnet101-coco.pth",
        meta={"how": "make deeplabv1_resnet101-coco.pth with kazuto1011/deeplab-pytorch's "
                     "scripts/setup_caffemodels.sh and 'python convert.py --dataset coco'",
              "notes": "the initialisation of the DeepLab v2 paper recipe (backbone only)"})
    DEFAULT = VOC_AUG_CAFFE_V1


class DeepLabV3_ResNet50_Weights(WeightsEnum):
    COCO_WITH_VOC_LABELS_V1 = _tv_deeplabv3(50, "cd0a2569", 66.4, 92.4)
    IMAGENET1K_BACKBONE = _imagenet(f"{_TV}resnet50-0676ba61.pth", "torchvision ResNet50_Weights.IMAGENET1K_V1",
                                    resnet_to_deeplab_backbone)
    DEFAULT = COCO_WITH_VOC_LABELS_V1


class DeepLabV3_ResNet101_Weights(WeightsEnum):
    COCO_WITH_VOC_LABELS_V1 = _tv_deeplabv3(101, "586e9e4e", 67.4, 92.4)
    IMAGENET1K_BACKBONE = _imagenet(f"{_TV}resnet101-63fe2227.pth", "torchvision ResNet101_Weights.IMAGENET1K_V1",
                                    resnet_to_deeplab_backbone)
    DEFAULT = COCO_WITH_VOC_LABELS_V1


def _v3_classifier(head: str = "torchvision", **_) -> str:
    return "classifier.4.weight" if head == "torchvision" else "classifier.1.weight"


register_model("deeplab_v1_largefov", deeplab_v1_largefov, weights=DeepLabV1_LargeFOV_Weights, family="v1",
               default_preprocessing="caffe", classifier_key=lambda **_: "fc8.weight")
register_model("deeplab_v1_msc_largefov", deeplab_v1_msc_largefov, weights=DeepLabV1_MSC_LargeFOV_Weights,
               family="v1", default_preprocessing="caffe", classifier_key=lambda **_: "fc8.weight")
register_model("deeplab_v2_resnet101", deeplab_v2_resnet101, weights=DeepLabV2_ResNet101_Weights, family="v2",
               default_preprocessing="caffe", classifier_key=lambda **_: "aspp.c0.weight")
register_model("deeplab_v3_resnet50", deeplab_v3_resnet50, weights=DeepLabV3_ResNet50_Weights, family="v3",
               default_preprocessing="torchvision", classifier_key=_v3_classifier)
register_model("deeplab_v3_resnet101", deeplab_v3_resnet101, weights=DeepLabV3_ResNet101_Weights, family="v3",
               default_preprocessing="torchvision", classifier_key=_v3_classifier)
