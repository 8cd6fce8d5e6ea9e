"""The registered models and their weights: data, read by ``get_model`` / ``get_model_weights`` /
``list_models`` (``deeplab_fast.models._api``).

Sources:
- torchvision's DeepLabV3 ResNet-50/101 weights (COCO train2017, the 20 VOC categories + background) and the
  ImageNet backbones it starts from: ``torchvision.models.segmentation.DeepLabV3_ResNet*_Weights``,
  ``ResNet*_Weights.IMAGENET1K_V1``, ``VGG16_Weights.IMAGENET1K_V1`` (BSD-3-Clause).
- torchvision's mobile DeepLabs (``DeepLabV3_MobileNet_V3_Large_Weights``, ``LRASPP_MobileNet_V3_Large_Weights``,
  COCO train2017 with the VOC categories; their GFLOPs are torchvision's ``_ops`` at 520x520) and the ImageNet
  MobileNetV2 / MobileNetV3-Large backbones.
- DeepLab v3+: no trained file is registered (neither the official TensorFlow checkpoints nor smp's are PyTorch
  files of this layout); the ImageNet backbones load by name, smp state dicts by path
  (``get_model(..., weights=path, flavor="smp", output_stride=...)``), and the published numbers are in the
  backbone member's ``meta["published"]`` with their source.
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

from ..data.voc import VOC_CLASSES
from ._api import Weights, WeightsEnum, get_model, register_model
from .deeplab import DeepLabV1, DeepLabV2, DeepLabV3
from .deeplabv3plus import DeepLabV3Plus
from .mobile import LRASPP, DeepLabV3MobileNetV3
from .transforms import SegmentationPreset, normalization_meta
from .weights import (convert_kazuto_deeplabv2, mobilenet_to_features_backbone, mobilenet_v2_to_deeplab_backbone,
                      resnet_to_deeplab_backbone, smp_deeplabv3plus_foreign, vgg16_to_deeplab_v1)

__all__ = ["DeepLabV1_LargeFOV_Weights", "DeepLabV1_MSC_LargeFOV_Weights", "DeepLabV2_ResNet101_Weights",
           "DeepLabV3_ResNet50_Weights", "DeepLabV3_ResNet101_Weights", "DeepLabV3_MobileNet_V3_Large_Weights",
           "LRASPP_MobileNet_V3_Large_Weights", "DeepLabV3Plus_ResNet50_Weights", "DeepLabV3Plus_ResNet101_Weights",
           "DeepLabV3Plus_MobileNet_V2_Weights", "COCO_STUFF_CLASSES", "deeplab_v1_largefov",
           "deeplab_v1_msc_largefov", "deeplab_v2_resnet101", "deeplab_v3_resnet50", "deeplab_v3_resnet101",
           "deeplab_v3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "deeplab_v3plus_resnet50",
           "deeplab_v3plus_resnet101", "deeplab_v3plus_mobilenet_v2", "deeplabv3_resnet50", "deeplabv3_resnet101",
           "deeplabv3_mobilenet_v3_large"]

_TV = "https://download.pytorch.org/models/"
_KAZUTO = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
_TV_RECIPE = "https://github.com/pytorch/vision/tree/main/references/segmentation#deeplabv3_resnet101"
_KAZUTO_REPO = "https://github.com/kazuto1011/deeplab-pytorch"

# COCO-Stuff's 182 label names (0..181; kazuto1011's data/datasets/cocostuff10k/labels.txt without "unlabeled").
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood",
    "water-other", "waterdrops", "window-blind", "window-other", "wood",
)


def _weights(url, mode: str, *, categories=None, source: str, recipe=None, **kw) -> Weights:
    meta = dict(kw.pop("meta", {}))
    meta.update(num_classes=len(categories) if categories else None, categories=categories,
                normalization=normalization_meta(mode), source=source, recipe=recipe)
    return Weights(url=url, transforms=partial(SegmentationPreset, mode), meta=meta, **kw)


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


_TV_MOBILE_RECIPE = "https://github.com/pytorch/vision/tree/main/references/segmentation#"
_MOBILENET_V3 = _imagenet(f"{_TV}mobilenet_v3_large-8738ca79.pth", "torchvision MobileNet_V3_Large_Weights.IMAGENET1K_V1",
                          mobilenet_to_features_backbone)


def _tv_mobile(file: str, arch: str, miou: float, gflops: float, params: int, aux: bool) -> Weights:
    kwargs = {"num_classes": len(VOC_CLASSES)}
    if aux:
        kwargs["aux_loss"] = True
    return _weights(f"{_TV}{file}", "torchvision", categories=VOC_CLASSES,
                    source=f"torchvision {arch}.COCO_WITH_VOC_LABELS_V1", recipe=_TV_MOBILE_RECIPE + arch,
                    model_kwargs=kwargs,
                    meta={"metrics": {"COCO-val2017-VOC-labels": {"miou": miou, "pixel_acc": 91.2}},
                          "gflops": gflops, "num_params": params,
                          "notes": "trained on the COCO train2017 images of the 20 VOC categories"
                                   + ("; includes the auxiliary head, so get_model builds aux_loss=True" if aux
                                      else "")})


class DeepLabV3_MobileNet_V3_Large_Weights(WeightsEnum):
    COCO_WITH_VOC_LABELS_V1 = _tv_mobile("deeplabv3_mobilenet_v3_large-fc3c493d.pth",
                                         "DeepLabV3_MobileNet_V3_Large_Weights", 60.3, 10.452, 11029328, aux=True)
    IMAGENET1K_BACKBONE = _MOBILENET_V3
    DEFAULT = COCO_WITH_VOC_LABELS_V1


class LRASPP_MobileNet_V3_Large_Weights(WeightsEnum):
    COCO_WITH_VOC_LABELS_V1 = _tv_mobile("lraspp_mobilenet_v3_large-d234d4ea.pth",
                                         "LRASPP_MobileNet_V3_Large_Weights", 57.9, 2.086, 3221538, aux=False)
    IMAGENET1K_BACKBONE = _MOBILENET_V3
    DEFAULT = COCO_WITH_VOC_LABELS_V1


_V3PLUS_PAPER = ("Chen et al., 'Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation', "
                 "ECCV 2018")


def _v3plus_backbone(url: str, source: str, converter, published: dict) -> Weights:
    w = _imagenet(url, source, converter)
    meta = dict(w.meta)
    meta["published"] = published
    return Weights(url=w.url, transforms=w.transforms, meta=meta, converter=w.converter, backbone_only=True)


_V3PLUS_R101_PUBLISHED = {
    "PASCAL VOC 2012 val, ResNet-101, output stride 16 (train and eval), decoder": {
        "miou": 78.85, "source": _V3PLUS_PAPER + ", table 3"},
    "PASCAL VOC 2012 test, Xception-65 (JFT + COCO pretraining; the paper's best)": {
        "miou": 89.0, "source": _V3PLUS_PAPER + ", abstract"},
}


class DeepLabV3Plus_ResNet50_Weights(WeightsEnum):
    IMAGENET1K_BACKBONE = _v3plus_backbone(
        f"{_TV}resnet50-0676ba61.pth", "torchvision ResNet50_Weights.IMAGENET1K_V1", resnet_to_deeplab_backbone,
        {"note": "the paper reports no ResNet-50 number; see DeepLabV3Plus_ResNet101_Weights"})


class DeepLabV3Plus_ResNet101_Weights(WeightsEnum):
    IMAGENET1K_BACKBONE = _v3plus_backbone(
        f"{_TV}resnet101-63fe2227.pth", "torchvision ResNet101_Weights.IMAGENET1K_V1", resnet_to_deeplab_backbone,
        _V3PLUS_R101_PUBLISHED)


class DeepLabV3Plus_MobileNet_V2_Weights(WeightsEnum):
    IMAGENET1K_BACKBONE = _v3plus_backbone(
        f"{_TV}mobilenet_v2-b0353104.pth", "torchvision MobileNet_V2_Weights.IMAGENET1K_V1",
        mobilenet_v2_to_deeplab_backbone,
        {"PASCAL VOC 2012 val, MobileNetV2, output stride 16, a PyTorch port (jfzhang95/pytorch-deeplab-xception)": {
            "miou": 70.81, "source": "https://github.com/jfzhang95/pytorch-deeplab-xception (README)"},
         "note": "the paper reports no MobileNetV2 DeepLab v3+ number"})


def _public(name: str, doc: str):
    """The public builder of a registered model, in torchvision's form."""

    def builder(*, weights=None, progress: bool = True, weights_backbone=None, **kwargs):
        return get_model(name, weights=weights, progress=progress, weights_backbone=weights_backbone, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = __name__
    builder.__doc__ = doc + _BUILDER_ARGS
    return builder


_BUILDER_ARGS = """

    Keyword arguments as torchvision's builders: ``weights`` (None, a weights name or member of this model's enum,
    torchvision's member for the same file, or a path / URL: ``deeplab_fast.models.get_model``), ``progress``
    (download progress bar), ``weights_backbone`` (ImageNet backbone weights, loaded when ``weights`` is None;
    default None: unlike torchvision nothing is downloaded unless asked), ``num_classes`` (None: 21, or what
    the weights fix) and the model's own options (``**kwargs``). Raises ValueError for arguments or weights that
    do not fit."""

deeplab_v1_largefov = _public("deeplab_v1_largefov", """DeepLab v1 LargeFOV (VGG-16, fc6 at dilation 12, output stride 8):
    ``DeepLabV1``; options ``width_divisor``, ``dropout``. Returns a Tensor of logits [N, num_classes, H, W]
    (not a dict: DeepLab v1 has no torchvision counterpart).""")
deeplab_v1_msc_largefov = _public("deeplab_v1_msc_largefov", """DeepLab v1 MSc-LargeFOV: LargeFOV plus the five
    multi-scale branches (``DeepLabV1(msc=True)``). Returns a Tensor of logits [N, num_classes, H, W].""")
deeplab_v2_resnet101 = _public("deeplab_v2_resnet101", """DeepLab v2 ResNet-101 + ASPP-L (``aspp="L"``) or ASPP-S
    (``"S"``), optional multi-scale inputs (``msc=True``, ``msc_scales``), ``backbone_style``: ``DeepLabV2``.
    Returns a Tensor of logits [N, num_classes, H, W] (kazuto1011's form), with MSC in training mode the
    per-scale list.""")
deeplab_v3_resnet50 = _public("deeplab_v3_resnet50", """DeepLab v3 ResNet-50: a drop-in for torchvision's
    ``deeplabv3_resnet50`` (the defaults are its model: output stride 8, no multi-grid; ``aux_loss``); returns
    its ``OrderedDict`` with ``"out"`` (and ``"aux"``). Options ``output_stride``, ``multi_grid``,
    ``head="paper"`` (output stride 16, multi-grid (1, 2, 4)): ``DeepLabV3``.""")
deeplab_v3_resnet101 = _public("deeplab_v3_resnet101", """DeepLab v3 ResNet-101: a drop-in for torchvision's
    ``deeplabv3_resnet101`` (see ``deeplab_v3_resnet50``).""")
deeplab_v3_mobilenet_v3_large = _public("deeplab_v3_mobilenet_v3_large", """DeepLab v3 on a dilated
    MobileNetV3-Large: torchvision's ``deeplabv3_mobilenet_v3_large`` (``DeepLabV3MobileNetV3``, ``aux_loss``);
    returns its ``OrderedDict`` with ``"out"`` (and ``"aux"``).""")
lraspp_mobilenet_v3_large = _public("lraspp_mobilenet_v3_large", """Lite R-ASPP on a dilated MobileNetV3-Large:
    torchvision's ``lraspp_mobilenet_v3_large`` (``LRASPP``); returns its ``OrderedDict`` with ``"out"``.""")
deeplab_v3plus_resnet50 = _public("deeplab_v3plus_resnet50", """DeepLab v3+ ResNet-50 (``DeepLabV3Plus``):
    ``output_stride`` 16 (default) or 8, ``flavor`` "paper" (default) or "smp". Returns an ``OrderedDict`` with
    ``"out"``.""")
deeplab_v3plus_resnet101 = _public("deeplab_v3plus_resnet101", """DeepLab v3+ ResNet-101 (``DeepLabV3Plus``):
    ``output_stride`` 16 (default) or 8, ``flavor`` "paper" (default) or "smp". Returns an ``OrderedDict`` with
    ``"out"``.""")
deeplab_v3plus_mobilenet_v2 = _public("deeplab_v3plus_mobilenet_v2", """DeepLab v3+ MobileNetV2
    (``DeepLabV3Plus``): ``output_stride`` 16 (default) or 8, ``flavor`` "paper" (default) or "smp". Returns an
    ``OrderedDict`` with ``"out"``.""")

# torchvision's names for the same builders, so torchvision's examples run with only the import changed.
deeplabv3_resnet50 = deeplab_v3_resnet50
deeplabv3_resnet101 = deeplab_v3_resnet101
deeplabv3_mobilenet_v3_large = deeplab_v3_mobilenet_v3_large

register_model("deeplab_v1_largefov", partial(DeepLabV1, msc=False), weights=DeepLabV1_LargeFOV_Weights,
               family="v1", default_mode="caffe", classifier_key=lambda **_: "fc8.weight",
               function=deeplab_v1_largefov)
register_model("deeplab_v1_msc_largefov", partial(DeepLabV1, msc=True), weights=DeepLabV1_MSC_LargeFOV_Weights,
               family="v1", default_mode="caffe", classifier_key=lambda **_: "fc8.weight",
               function=deeplab_v1_msc_largefov)
register_model("deeplab_v2_resnet101", DeepLabV2, weights=DeepLabV2_ResNet101_Weights, family="v2",
               default_mode="caffe", classifier_key=lambda **_: "aspp.c0.weight", function=deeplab_v2_resnet101)
register_model("deeplab_v3_resnet50", partial(DeepLabV3, 50), weights=DeepLabV3_ResNet50_Weights, family="v3",
               default_mode="torchvision", classifier_key=_v3_classifier, function=deeplab_v3_resnet50)
register_model("deeplab_v3_resnet101", partial(DeepLabV3, 101), weights=DeepLabV3_ResNet101_Weights, family="v3",
               default_mode="torchvision", classifier_key=_v3_classifier, function=deeplab_v3_resnet101)
register_model("deeplab_v3_mobilenet_v3_large", DeepLabV3MobileNetV3, weights=DeepLabV3_MobileNet_V3_Large_Weights,
               family="v3", default_mode="torchvision", classifier_key=lambda **_: "classifier.4.weight",
               function=deeplab_v3_mobilenet_v3_large)
register_model("lraspp_mobilenet_v3_large", LRASPP, weights=LRASPP_MobileNet_V3_Large_Weights, family="v3",
               default_mode="torchvision", classifier_key=lambda **_: "classifier.low_classifier.weight",
               function=lraspp_mobilenet_v3_large)
for _backbone, _enum, _fn in (("resnet50", DeepLabV3Plus_ResNet50_Weights, deeplab_v3plus_resnet50),
                              ("resnet101", DeepLabV3Plus_ResNet101_Weights, deeplab_v3plus_resnet101),
                              ("mobilenet_v2", DeepLabV3Plus_MobileNet_V2_Weights, deeplab_v3plus_mobilenet_v2)):
    register_model(f"deeplab_v3plus_{_backbone}", partial(DeepLabV3Plus, _backbone), weights=_enum, family="v3",
                   default_mode="torchvision", classifier_key=lambda **_: "classifier.weight", function=_fn,
                   foreign=smp_deeplabv3plus_foreign)
