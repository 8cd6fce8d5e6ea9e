"""The model families: everything training needs to know about a kind of DeepLab, in one object per family.

A registered model names its family (``deeplab_fast.models.model_entry(name).family``, a key of :data:`FAMILIES`);
the :class:`Family` says how it trains: what the loss is computed on (``forward``), the loss, how the model is put
in training mode (v2: frozen BatchNorm statistics), which modules are the head that trains at ``head_lr_mult`` x
the base learning rate, the model options the command line exposes as flags, and the family's recipes (the first
is the default of ``deeplab-fast train --model NAME`` for a model that has none of its own). Inference facts (the
CRF preset a model's weights were evaluated with) are in the weights' metadata (``meta["crf_preset"]``), so
``deeplab_fast.models`` never depends on ``deeplab_fast.train``. Adding a family: one :class:`Family` here and the
registry entries (``deeplab_fast/models/zoo.py``) that name it.

Sources: v1: Chen et al., ICLR 2015, sec. 4.1 (batch 20, lr 1e-3, 6000 iterations; a step policy there, poly
here); v2: TPAMI 2017, sec. 4.1 / Table 4 (poly, batch 10, 20k iterations, 321 crops) with the ResNet lr 2.5e-4
of the released prototxt (kazuto1011/deeplab-pytorch ``configs/voc12.yaml``); v3: arXiv:1706.05587, sec. 4.1
(lr 7e-3, poly, crop 513, batch 16, output stride 16, 30k iterations); v3+: Chen et al., "Encoder-Decoder with
Atrous Separable Convolution ...", ECCV 2018, sec. 4 (the v3 protocol: lr 7e-3, poly, crop 513, batch 16, output
stride 16, BN trained); the mobile models: torchvision's ``references/segmentation`` (README and ``train.py``:
lr 0.01, 8 GPUs x 4 images, 30 epochs, weight decay 1e-6, crops of 480 after a random resize of the short side
to 260-1040, the auxiliary loss at 0.5 and the auxiliary classifier at 10x the lr, everything else at 1x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .losses import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy

__all__ = ["Family", "Recipe", "FAMILIES", "DEFAULT_WEIGHT_DECAY", "family", "compute_loss"]

DEFAULT_WEIGHT_DECAY = 5e-4  # the DeepLab papers' (Caffe prototxts: 5e-4)


@dataclass(frozen=True)
class Recipe:
    """One training recipe. ``model_kwargs``: the recipe's model options; ``family_model_kwargs``: the part of them
    that is also the default of ``train --model`` without ``--recipe``; ``init``: the registered weights the recipe
    starts from (``get_model_weights(model)`` member name); ``eval``: the ``deeplab-fast eval`` options of the
    paper's evaluation; ``settings``: what the source says, for the docs; ``weight_decay``: SGD's (biases get
    none)."""

    name: str
    title: str
    family: str
    model: str
    init: Optional[str]
    steps: int
    batch_size: int
    lr: float
    crop_size: int
    eval: str
    settings: str
    model_kwargs: Mapping = field(default_factory=dict)
    family_model_kwargs: Mapping = field(default_factory=dict)
    weight_decay: float = DEFAULT_WEIGHT_DECAY


def _train_mode(model: nn.Module) -> None:
    model.train()


def _train_mode_frozen_bn(model: nn.Module) -> None:
    model.train()
    if hasattr(model, "freeze_bn"):
        model.freeze_bn()


def _scores_at_stride(model: nn.Module, x: torch.Tensor):
    return model.forward_logits(x)


def _v2_scores(model: nn.Module, x: torch.Tensor):
    return model.msc_logits(x) if getattr(model, "msc", False) is True else model.forward_logits(x)


def _full_output(model: nn.Module, x: torch.Tensor):
    return model(x)


def _downsampled_loss(out, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if isinstance(out, (list, tuple)):  # v2 MSC: [scale 1, smaller scales..., max]
        return msc_loss(list(out[:-1]), out[-1], target, ignore_index=ignore_index, downsample=True)
    return downsampled_cross_entropy(out, target, ignore_index=ignore_index)


def _with_aux(aux_weight: float) -> Callable:
    def loss(out, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if not isinstance(out, dict):
            return upsampled_cross_entropy(out, target, ignore_index=ignore_index)
        total = upsampled_cross_entropy(out["out"], target, ignore_index=ignore_index)
        if out.get("aux") is not None:
            total = total + aux_weight * upsampled_cross_entropy(out["aux"], target, ignore_index=ignore_index)
        return total
    return loss


def _main_output_loss(out, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return upsampled_cross_entropy(out["out"] if isinstance(out, dict) else out, target, ignore_index=ignore_index)


@dataclass(frozen=True)
class Family:
    """How one kind of DeepLab trains.

    - ``forward(model, x)``: the training output the loss takes (v1 / v2: the scores at the output stride, v2
      MSC: the per-scale list; the others: ``model(x)``, torchvision's ``{"out"[, "aux"]}``).
    - ``loss(out, target, ignore_index)``: a 0-dim tensor (:mod:`deeplab_fast.train.losses`).
    - ``train_mode(model)``: ``model.train()`` and what the family adds (v2: ``freeze_bn()``).
    - ``head_attributes``: the model attributes whose modules train at ``head_lr_mult`` x the base lr
      (``param_groups(head=...)``); those that are missing or None are skipped, and with none at all every
      parameter trains at the base lr.
    - ``options``: the model keyword arguments the command line has flags for (``--width-divisor``).
    - ``recipes``: the family's recipes; the first is the default one.
    - ``loss_doc``: one line for ``deeplab-fast train --help``.
    """

    name: str
    forward: Callable[[nn.Module, torch.Tensor], Any]
    loss: Callable[[Any, torch.Tensor, int], torch.Tensor]
    head_attributes: Tuple[str, ...]
    recipes: Tuple[Recipe, ...]
    loss_doc: str
    train_mode: Callable[[nn.Module], None] = _train_mode
    options: Tuple[str, ...] = ()

    @property
    def recipe(self) -> Recipe:
        """The default recipe of the family."""
        return self.recipes[0]

    def head_modules(self, model: nn.Module) -> List[nn.Module]:
        """The model's head modules (``head_attributes`` that are modules), in that order."""
        return [getattr(model, a) for a in self.head_attributes if isinstance(getattr(model, a, None), nn.Module)]


_V3_EVAL = "--scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip"
_TV_MOBILE = ("torchvision's reference recipe (references/segmentation): ImageNet MobileNetV3-Large init, lr 0.01, "
              "8 GPUs x 4 images, 30 epochs of COCO (the 20 VOC categories), weight decay 1e-6, poly 0.9, crops of "
              "480 after resizing the short side to 260-1040, flips; {aux}. Here on "
              "VOC-aug: 30 epochs of its 10,582 images at batch 32 (no COCO loader yet), random scaling 0.5-1.5 "
              "(ours) instead of the short-side resize")
_MOBILE_STEPS = 30 * 10582 // 32

_FAMILIES = (
    Family(
        name="v1", forward=_scores_at_stride, loss=_downsampled_loss, head_attributes=("fc8", "msc"),
        options=("width_divisor",),
        loss_doc="cross-entropy at 1/8 against the labels downsampled to it",
        recipes=(Recipe(
            name="v1_largefov", title="v1 LargeFOV (Chen et al., ICLR 2015, sec. 4)", family="v1",
            model="deeplab_v1_largefov", init="IMAGENET1K_VGG16_BACKBONE", steps=6000, batch_size=20, lr=1e-3,
            crop_size=321, eval="--crf deeplab_v2_voc",
            settings="ImageNet VGG-16 init (torchvision's `vgg16` weights, into `features`); batch 20, crop 321, lr "
                     "1e-3 (10x for fc8), momentum 0.9, weight decay 5e-4, 6000 iterations (the paper steps the lr "
                     "by 0.1 every 2000; here poly); loss against the labels downsampled by 8; CRF "
                     "`deeplab_v2_voc`-style kernels cross-validated on val"),)),
    Family(
        name="v2", forward=_v2_scores, loss=_downsampled_loss, head_attributes=("aspp",),
        train_mode=_train_mode_frozen_bn,
        loss_doc="as v1; with --model-kwargs '{\"msc\": true}' the MSC loss (each scale and the max); BN frozen",
        recipes=(Recipe(
            name="v2_aspp_l_msc", title="v2 ResNet-101 ASPP-L MSC (TPAMI 2017, sec. 4.1)", family="v2",
            model="deeplab_v2_resnet101", init="COCO_INIT_CAFFE", steps=20000, batch_size=10, lr=2.5e-4,
            crop_size=321, eval="--crf deeplab_v2_voc", model_kwargs={"msc": True},
            settings="COCO-initialised ResNet-101 (kazuto1011's converted Caffe `init` model; BN frozen); batch 10, "
                     "crop 321, lr 2.5e-4, poly 0.9, 20k iterations, random scaling 0.5-1.5 and flips; MSC loss "
                     "over 1, 0.75/0.5 and max; eval at 1 scale (MSC inside the model) + CRF `deeplab_v2_voc`"),)),
    Family(
        name="v3", forward=_full_output, loss=_with_aux(0.4), head_attributes=("classifier", "aux_classifier"),
        loss_doc="cross-entropy on the upsampled logits (+0.4 x aux with '{\"aux_loss\": true}')",
        recipes=(Recipe(
            name="v3_os16", title="v3 ResNet-101 OS16 (arXiv:1706.05587, sec. 4)", family="v3",
            model="deeplab_v3_resnet101", init="IMAGENET1K_BACKBONE", steps=30000, batch_size=16, lr=7e-3,
            crop_size=513, eval=_V3_EVAL,
            model_kwargs={"head": "paper", "output_stride": 16}, family_model_kwargs={"output_stride": 16},
            settings="ImageNet ResNet-101 init (torchvision's weights, into `backbone`); batch 16, crop 513, lr "
                     "7e-3, poly 0.9, output stride 16 (multi-grid 1, 2, 4), 30k iterations; eval over six scales "
                     "with flips (the paper also fine-tunes at OS8 with frozen BN)"),)),
    Family(
        name="v3plus", forward=_full_output, loss=_main_output_loss,
        head_attributes=("aspp", "low_level", "decoder", "classifier"),
        loss_doc="cross-entropy on the logits at the input size (the decoder's stride-4 scores, resized)",
        recipes=(Recipe(
            name="v3plus_os16", title="v3+ ResNet-101 OS16 (Chen et al., ECCV 2018, sec. 4)", family="v3plus",
            model="deeplab_v3plus_resnet101", init="IMAGENET1K_BACKBONE", steps=30000, batch_size=16, lr=7e-3,
            crop_size=513, eval="--scales 1.0",
            model_kwargs={"flavor": "paper", "output_stride": 16}, family_model_kwargs={"output_stride": 16},
            settings="ImageNet ResNet-101 init (torchvision's weights, into `backbone`); the v3 protocol: batch 16, "
                     "crop 513, lr 7e-3, poly 0.9, output stride 16 in training and eval, BN trained, random "
                     "scaling and flips, 30k iterations; the ASPP, low-level projection and decoder at 10x; 78.85 "
                     "mIoU on val at one scale (table 3; the paper adds multi-scale and flipped inputs). The "
                     "paper's Cityscapes recipe (769 crops) needs a Cityscapes loader, which deeplab_fast does not "
                     "have yet"),)),
    Family(
        name="mobile", forward=_full_output, loss=_with_aux(0.5), head_attributes=("aux_classifier",),
        loss_doc="torchvision's: cross-entropy on the upsampled logits (+0.5 x aux)",
        recipes=(
            Recipe(
                name="v3_mobilenet_v3_large", title="v3 MobileNetV3-Large (torchvision's reference)",
                family="mobile", model="deeplab_v3_mobilenet_v3_large", init="IMAGENET1K_BACKBONE",
                steps=_MOBILE_STEPS, batch_size=32, lr=0.01, crop_size=480, eval="--scales 1.0",
                weight_decay=1e-6, model_kwargs={"aux_loss": True}, family_model_kwargs={"aux_loss": True},
                settings=_TV_MOBILE.format(aux="the auxiliary loss at 0.5, the auxiliary classifier at 10x the lr, "
                                                  "everything else at the base lr")),
            Recipe(
                name="lraspp_mobilenet_v3_large", title="LR-ASPP MobileNetV3-Large (torchvision's reference)",
                family="mobile", model="lraspp_mobilenet_v3_large", init="IMAGENET1K_BACKBONE",
                steps=_MOBILE_STEPS, batch_size=32, lr=0.01, crop_size=480, eval="--scales 1.0",
                weight_decay=1e-6, settings=_TV_MOBILE.format(aux="no auxiliary head: every layer at the base lr")))),
)

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _FAMILIES})


def family(name) -> Family:
    """The :class:`Family` named ``name`` (a ``FAMILIES`` key; a Family is returned as is); ValueError naming the
    known families otherwise."""
    if isinstance(name, Family):
        return name
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def compute_loss(family_or_name, out, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The training loss of a model family (a :class:`Family` or its name, ``models.model_entry(name).family``)
    on its training output (``Family.forward``):

    * v1 and v2: cross-entropy on the 1/8-resolution scores against labels downsampled to that grid
      (:func:`downsampled_cross_entropy`, the Caffe recipe); v2 with ``msc=True`` (a list ``[1x, smaller
      scales..., max]``): :func:`msc_loss` over the per-scale and max-fused scores (kazuto1011's recipe).
    * v3, v3+ and the mobile models: cross-entropy on the logits upsampled to the crop
      (:func:`upsampled_cross_entropy`), plus the auxiliary head's loss when ``out`` has ``"aux"``: 0.4 x for
      v3, 0.5 x for the mobile models (torchvision's reference recipe); v3+ has no auxiliary head.
    """
    return family(family_or_name).loss(out, target, ignore_index)
