"""Loading weights into the DeepLab models: checkpoint files, and the key maps of torchvision's DeepLab v3 and
backbones (ResNet, VGG-16, MobileNetV2/V3), of kazuto1011/deeplab-pytorch's DeepLab v2 checkpoints and of
segmentation_models_pytorch's DeepLabV3Plus. Nothing here downloads anything (the
registry, ``deeplab_fast.models.get_model(weights=...)``, does) or imports torchvision.

- ``load_checkpoint(path)``: a state dict from a file, read with ``torch.load(weights_only=True)``; ValueError
  naming the file for anything that is not one. ``as_state_dict(obj, source)``: the same checks on a loaded
  object.
- ``load_weights(model, state_dict)``: ``load_state_dict`` with a clear ValueError (missing / unexpected keys,
  shape mismatches, what the model expects) instead of a RuntimeError. DeepLab v2 models accept kazuto1011's
  key names directly (converted on the way).
- ``load_torchvision_deeplabv3(model, state_dict)``, ``from_torchvision(tv_model)``: torchvision's DeepLab v3.
- ``load_vgg16_features(model, state_dict)``: torchvision's VGG-16 convs into DeepLab v1.
- Converters (the registry attaches them to weights entries): ``vgg16_to_deeplab_v1``,
  ``resnet_to_deeplab_backbone``, ``convert_kazuto_deeplabv2`` (and its inverse ``to_kazuto_deeplabv2``; the
  kazuto1011 key map is documented there).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from .deeplab import DeepLabV1, DeepLabV2, DeepLabV3

__all__ = ["CheckpointError", "load_checkpoint", "as_state_dict", "load_weights", "load_torchvision_deeplabv3", "from_torchvision",
           "load_vgg16_features", "convert_kazuto_deeplabv2", "to_kazuto_deeplabv2", "is_kazuto_deeplabv2",
           "vgg16_to_deeplab_v1", "resnet_to_deeplab_backbone", "key_list", "mobilenet_to_features_backbone",
           "mobilenet_v2_to_deeplab_backbone", "is_smp_deeplabv3plus", "convert_smp_deeplabv3plus",
           "smp_deeplabv3plus_foreign"]

_SHOW = 8  # keys listed per category in error messages


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint: unreadable by ``torch.load(weights_only=True)`` (text,
    truncated, corrupt, a pickle that would run code) or holding something other than what was expected."""


def _describe(model: nn.Module) -> str:
    arch = getattr(model, "arch", None)
    extra = []
    if isinstance(model, DeepLabV3):
        extra = [f"head={model.head!r}", f"aux_loss={model.aux_loss}"]
    if getattr(model, "num_classes", None) is not None:
        extra.append(f"num_classes={model.num_classes}")
    name = type(model).__name__ + (f" '{arch}'" if arch else "")
    return name + (f" ({', '.join(extra)})" if extra else "")


def key_list(keys, show: int = _SHOW) -> str:
    """The first ``show`` keys, comma-separated, and how many more."""
    keys = list(keys)
    head = ", ".join(keys[:show])
    return head + (f", ... ({len(keys) - show} more)" if len(keys) > show else "")


def _check_state_dict(state_dict, owner: str) -> None:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{owner}: expected a state dict (a mapping of names to tensors), got "
                         f"{type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{owner}: not a state dict: {len(bad)} entries are not str -> Tensor, e.g. "
                         f"{key_list(map(repr, bad), 4)}")


def load_weights(model: nn.Module, state_dict: Mapping, strict: bool = True, _owner: str = "load_weights"):
    """``model.load_state_dict(state_dict, strict)`` with clear errors; returns ``model``.

    Raises ValueError naming the missing keys (strict only), unexpected keys (strict only) and shape mismatches
    (always), with the model's architecture and how many entries it expects. A ``DeepLabV2`` also takes
    kazuto1011/deeplab-pytorch key names (``base.layer1.conv1.conv.weight``, ...: ``convert_kazuto_deeplabv2``).
    """
    _check_state_dict(state_dict, _owner)
    if isinstance(model, DeepLabV2) and is_kazuto_deeplabv2(state_dict):
        state_dict = convert_kazuto_deeplabv2(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys ({key_list(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({key_list(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({key_list(shapes, 4)})")
    if problems:
        raise ValueError(f"{_owner}: the state dict does not fit {_describe(model)}: " + "; ".join(problems)
                         + f". The model expects {len(expected)} entries, e.g. {key_list(expected, 4)}; "
                         f"the state dict has {len(state_dict)}, e.g. {key_list(state_dict, 4)}. "
                         "Build the model that matches the checkpoint (architecture, num_classes, aux_loss).")
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:  # what the checks above missed
        raise ValueError(f"{_owner}: the state dict does not fit {_describe(model)}: {e}") from e
    return model


def load_checkpoint(path) -> "OrderedDict[str, torch.Tensor]":
    """A state dict read from ``path`` with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` (a ``deeplab-fast
    train`` checkpoint); a ``module.`` prefix on every key (``nn.DataParallel``) is removed. Raises
    FileNotFoundError for a missing file and ValueError, naming the file and what was expected, for anything
    else: a directory, a file ``torch.load`` cannot read with ``weights_only=True`` (text, truncated, corrupt, a
    pickled model object, a pickle that would run code), or content that is not a state dict (names -> tensors).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no such file: '{path}'")
    if os.path.isdir(path):
        raise ValueError(f"load_checkpoint: '{path}' is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on foreign files (KeyError, struct.error, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"load_checkpoint: cannot read '{path}' as a weights-only PyTorch checkpoint (a state "
                         f"dict of tensors saved with torch.save): {type(e).__name__}: {first[:200]}") from None
    return as_state_dict(obj, path)


def as_state_dict(obj, source) -> "OrderedDict[str, torch.Tensor]":
    """``obj`` (what ``torch.load`` returned for ``source``) as a state dict: unwrapped from ``{"state_dict": ...}``
    or ``{"model": ...}``, without a ``module.`` prefix on every key. ValueError naming ``source`` otherwise."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    try:
        _check_state_dict(obj, "load_checkpoint")
    except ValueError as e:
        what = (f"top-level keys {key_list(map(repr, obj), 6)}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise CheckpointError(f"load_checkpoint: '{source}' holds {what}, not a state dict (or one under 'state_dict' / "
                         f"'model'): {e}") from None
    if not obj:
        raise CheckpointError(f"load_checkpoint: '{source}' holds an empty state dict")
    sd = OrderedDict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def vgg16_to_deeplab_v1(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's ``vgg16`` state dict -> DeepLab v1's ``features.*`` entries (the classifier is dropped)."""
    _check_state_dict(state_dict, "vgg16_to_deeplab_v1")
    out = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith("features."))
    if not out:
        raise ValueError("vgg16_to_deeplab_v1: no 'features.*' entries: not a torchvision vgg16 state dict")
    return out


def resnet_to_deeplab_backbone(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's ``resnet50/101`` state dict -> the DeepLab models' ``backbone.*`` entries (``fc`` dropped)."""
    _check_state_dict(state_dict, "resnet_to_deeplab_backbone")
    return OrderedDict((f"backbone.{k}", v) for k, v in state_dict.items() if not k.startswith("fc."))


# ----------------------------------------------------------------------------------------------------------
# torchvision


def load_torchvision_deeplabv3(model: DeepLabV3, state_dict: Mapping, drop_aux: bool = True) -> DeepLabV3:
    """Loads a torchvision ``deeplabv3_resnet50/101`` state dict into ``model`` (``strict=True``); returns it.

    The names are identical; ``drop_aux`` (default True) drops the ``aux_classifier.*`` entries when ``model``
    was built without ``aux_loss`` (torchvision's released weights include the aux head). Raises ValueError,
    naming the missing/unexpected keys and what the model expects, when the architectures differ (ResNet-50
    weights into a ResNet-101 model, another ``num_classes``, the "paper" head, ...).
    """
    if not isinstance(model, DeepLabV3):
        raise ValueError(f"load_torchvision_deeplabv3: model must be a DeepLabV3, got {type(model).__name__}")
    _check_state_dict(state_dict, "load_torchvision_deeplabv3")
    if drop_aux and model.aux_classifier is None:
        state_dict = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith("aux_classifier."))
    return load_weights(model, state_dict, strict=True, _owner="load_torchvision_deeplabv3")


def from_torchvision(tv_model: nn.Module) -> DeepLabV3:
    """A ``DeepLabV3`` equal to a torchvision ``DeepLabV3`` instance (ResNet-50/101 backbone): same weights,
    buffers, dtype, device and train/eval mode.

    ResNet-50 vs 101 is read from layer3's block count (6 / 23), ``num_classes`` from ``classifier[4]``, the aux
    head from ``aux_classifier``, the output stride from layer3's and layer4's strides, the ASPP rates from
    ``classifier[0]``. Raises ValueError for other models (e.g. the MobileNet-V3 DeepLab).
    """
    owner = "from_torchvision"
    try:
        backbone = tv_model.backbone
        n3 = len(backbone.layer3)
        stride3 = tuple(backbone.layer3[0].conv2.stride)
        stride4 = tuple(backbone.layer4[0].conv2.stride)
        dilations = [int(b.conv2.dilation[0]) for name in ("layer1", "layer2", "layer3", "layer4")
                     for b in getattr(backbone, name)]
        classifier = tv_model.classifier
        num_classes = int(classifier[4].out_channels)
        aspp = classifier[0]
        rates = tuple(int(c[0].dilation[0]) for c in list(aspp.convs)[1:-1])
        aux = getattr(tv_model, "aux_classifier", None) is not None
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"{owner}: not a torchvision DeepLabV3 with a ResNet-50/101 backbone "
                         f"({type(tv_model).__name__}): {type(e).__name__}: {e}") from e
    depth = {6: 50, 23: 101}.get(n3)
    if depth is None:
        raise ValueError(f"{owner}: layer3 has {n3} blocks; expected 6 (ResNet-50) or 23 (ResNet-101)")
    if stride4 != (1, 1):
        raise ValueError(f"{owner}: layer4 is not dilated (output stride 32); only output strides 8 and 16 are "
                         "supported")
    output_stride = 8 if stride3 == (1, 1) else 16
    model = DeepLabV3(depth, num_classes, output_stride=output_stride, multi_grid=None, head="torchvision",
                      aux_loss=aux)
    ours = [d for name in ("layer1", "layer2", "layer3", "layer4")
            for d in model.backbone.block_dilations()[name]]
    if ours != dilations:
        raise ValueError(f"{owner}: the backbone's dilations {dilations} are not torchvision's for output stride "
                         f"{output_stride} ({ours})")
    if rates != model.atrous_rates:
        from ..nn.aspp import ASPP

        model.classifier[0] = ASPP.from_torchvision(aspp).float().train()
    p = next(tv_model.parameters())
    model = model.to(device=p.device, dtype=p.dtype)
    load_weights(model, tv_model.state_dict(), strict=True, _owner=owner)
    return model.train(tv_model.training)


def load_vgg16_features(model: DeepLabV1, state_dict: Mapping) -> DeepLabV1:
    """Loads VGG-16 conv weights into a DeepLab v1 model's ``features`` (strict on all 13 convs); returns it.

    ``state_dict``: torchvision's ``vgg16().state_dict()`` (``features.*`` used, ``classifier.*`` ignored) or
    ``vgg16().features.state_dict()`` (keys ``0.weight`` ...). fc6/fc7/fc8 (and the MSC branches) keep their
    initialisation. Raises ValueError when a conv is missing or has the wrong shape.
    """
    if not isinstance(model, DeepLabV1):
        raise ValueError(f"load_vgg16_features: model must be a DeepLabV1, got {type(model).__name__}")
    _check_state_dict(state_dict, "load_vgg16_features")
    if any(k.startswith("features.") for k in state_dict):
        sd = OrderedDict((k[len("features."):], v) for k, v in state_dict.items() if k.startswith("features."))
    else:
        sd = OrderedDict(state_dict)
    load_weights(model.features, sd, strict=True, _owner="load_vgg16_features")
    return model


# ----------------------------------------------------------------------------------------------------------
# kazuto1011/deeplab-pytorch DeepLab v2

_KAZUTO_PREFIX = r"^(?:module\.)?(?:base\.|scale\.)?"
_KAZUTO_STEM = re.compile(_KAZUTO_PREFIX + r"layer1\.conv1\.(conv|bn)\.(\w+)$")
_KAZUTO_BLOCK = re.compile(_KAZUTO_PREFIX + r"layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)"
                           r"\.(conv|bn)\.(\w+)$")
_KAZUTO_ASPP = re.compile(_KAZUTO_PREFIX + r"aspp\.(?:stages\.)?c(\d+)\.(weight|bias)$")
_UNIT = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
         "shortcut": ("downsample.0", "downsample.1"), "proj": ("downsample.0", "downsample.1")}


def is_kazuto_deeplabv2(state_dict: Mapping) -> bool:
    """Whether the keys look like kazuto1011's DeepLabV2 (a stem key ``[base.]layer1.conv1.conv.weight``)."""
    return any(isinstance(k, str) and _KAZUTO_STEM.match(k) for k in state_dict)


def convert_kazuto_deeplabv2(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """kazuto1011/deeplab-pytorch DeepLab v2 key names -> ``DeepLabV2``'s (tensors shared, not copied).

    For the Caffe-converted ``deeplabv2_resnet101_msc-vocaug.pth`` and the PyTorch-trained
    ``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` / ``-cocostuff10k-20000.pth``. In that repository
    ``DeepLabV2`` is an ``nn.Sequential`` of ``layer1`` (``_Stem``: ``conv1`` = ``_ConvBnReLU`` with ``.conv``
    and ``.bn``, then ``pool``), ``layer2``..``layer5`` (``_ResLayer`` of ``_Bottleneck`` blocks ``block1``..,
    each with ``reduce``, ``conv3x3``, ``increase`` and, in block1, ``shortcut``, all ``_ConvBnReLU``) and
    ``aspp`` (``_ASPP``: ``c0``..``c3``); ``MSC`` wraps it as ``base``. The map (k = 1..4, j = 1..blocks,
    ``*`` = weight / bias / running_mean / running_var / num_batches_tracked):

    =================================================  ==========================================
    kazuto1011 (``base.`` optional)                    ``DeepLabV2``
    =================================================  ==========================================
    ``base.layer1.conv1.conv.weight``                  ``backbone.conv1.weight``
    ``base.layer1.conv1.bn.*``                         ``backbone.bn1.*``
    ``base.layer{k+1}.block{j}.reduce.conv.weight``    ``backbone.layer{k}.{j-1}.conv1.weight``
    ``base.layer{k+1}.block{j}.reduce.bn.*``           ``backbone.layer{k}.{j-1}.bn1.*``
    ``base.layer{k+1}.block{j}.conv3x3.{conv,bn}``     ``backbone.layer{k}.{j-1}.{conv2,bn2}``
    ``base.layer{k+1}.block{j}.increase.{conv,bn}``    ``backbone.layer{k}.{j-1}.{conv3,bn3}``
    ``base.layer{k+1}.block1.shortcut.{conv,bn}``      ``backbone.layer{k}.0.downsample.{0,1}``
    ``base.aspp.c{i}.{weight,bias}``                   ``aspp.c{i}.{weight,bias}``
    =================================================  ==========================================

    Also accepted: the prefixes ``module.`` (DataParallel) and ``scale.`` (older MSC), and that repository's
    older names ``proj`` (for ``shortcut``) and ``aspp.stages.c{i}``. The architecture that gives these weights
    their meaning (stride in ``reduce``, every block of layer4/layer5 at dilation 2/4, ceil-mode stem pool) is
    ``DeepLabV2(backbone_style="caffe")``, the default. The map follows the public source of
    kazuto1011/deeplab-pytorch (``libs/models/{resnet,deeplabv2,msc}.py``, ``convert.py``); it was checked
    against a re-statement of that module tree, not against a downloaded checkpoint (nothing is downloaded).
    Raises ValueError on keys it does not recognise.
    """
    _check_state_dict(state_dict, "convert_kazuto_deeplabv2")

    def block(m):
        layer, blk, unit, part, param = m.groups()
        conv, bn = _UNIT[unit]
        return f"backbone.layer{int(layer) - 1}.{int(blk) - 1}.{conv if part == 'conv' else bn}.{param}"

    return _rename(state_dict, [
        (_KAZUTO_STEM, lambda m: f"backbone.{'conv1' if m.group(1) == 'conv' else 'bn1'}.{m.group(2)}"),
        (_KAZUTO_BLOCK, block),
        (_KAZUTO_ASPP, lambda m: f"aspp.c{m.group(1)}.{m.group(2)}"),
    ], "convert_kazuto_deeplabv2", "kazuto1011 DeepLabV2 names")


def _rename(state_dict: Mapping, rules, owner: str, names: str, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Each key renamed by the first (regex, match -> new key) rule that matches it, under ``prefix``; ValueError
    for keys no rule matches and for two keys with one new name. Tensors are shared, not copied."""
    out = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        for pattern, new_key in rules:
            m = pattern.match(key)
            if m:
                new = prefix + new_key(m)
                if new in out:
                    raise ValueError(f"{owner}: two keys map to '{new}' (the second: '{key}')")
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{owner}: {len(unknown)} keys are not {names}: {key_list(unknown)}")
    return out


def to_kazuto_deeplabv2(state_dict: Mapping, prefix: str = "base.") -> "OrderedDict[str, torch.Tensor]":
    """The inverse of ``convert_kazuto_deeplabv2``: ``DeepLabV2`` keys -> kazuto1011's, under ``prefix``
    (``"base."`` for its ``MSC`` model, ``""`` for a bare ``DeepLabV2``). Raises ValueError on other keys."""
    _check_state_dict(state_dict, "to_kazuto_deeplabv2")
    inverse = {"conv1": ("reduce", "conv"), "bn1": ("reduce", "bn"), "conv2": ("conv3x3", "conv"),
               "bn2": ("conv3x3", "bn"), "conv3": ("increase", "conv"), "bn3": ("increase", "bn"),
               "downsample.0": ("shortcut", "conv"), "downsample.1": ("shortcut", "bn")}

    def block(m):
        layer, idx, mod, param = m.groups()
        unit, part = inverse[mod]
        return f"layer{int(layer) + 1}.block{int(idx) + 1}.{unit}.{part}.{param}"

    return _rename(state_dict, [
        (re.compile(r"^backbone\.(conv1|bn1)\.(\w+)$"),
         lambda m: f"layer1.conv1.{'conv' if m.group(1) == 'conv1' else 'bn'}.{m.group(2)}"),
        (re.compile(r"^backbone\.layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)$"), block),
        (re.compile(r"^aspp\.c(\d+)\.(weight|bias)$"), lambda m: f"aspp.c{m.group(1)}.{m.group(2)}"),
    ], "to_kazuto_deeplabv2", "DeepLabV2 names", prefix)


# ----------------------------------------------------------------------------------------------------------
# MobileNet backbones (torchvision) and segmentation_models_pytorch's DeepLabV3Plus


def mobilenet_to_features_backbone(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's ``mobilenet_v3_large`` state dict -> the mobile DeepLabs' ``backbone.{i}.*`` entries
    (``features.{i}`` -> ``backbone.{i}``, the classifier dropped), as torchvision's segmentation builders
    load ``weights_backbone``."""
    _check_state_dict(state_dict, "mobilenet_to_features_backbone")
    out = OrderedDict((f"backbone.{k[len('features.'):]}", v) for k, v in state_dict.items()
                      if k.startswith("features."))
    if not out:
        raise ValueError("mobilenet_to_features_backbone: no 'features.*' entries: not a torchvision MobileNet")
    return out


def mobilenet_v2_to_deeplab_backbone(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's ``mobilenet_v2`` state dict -> DeepLab v3+'s ``backbone.features.*`` entries (the
    classifier dropped; ``features.18`` too, which the paper flavor does not have: the smp flavor's then keeps
    its initialisation, as segmentation_models_pytorch's ImageNet encoder would not)."""
    _check_state_dict(state_dict, "mobilenet_v2_to_deeplab_backbone")
    out = OrderedDict((f"backbone.{k}", v) for k, v in state_dict.items()
                      if k.startswith("features.") and not k.startswith("features.18."))
    if not out:
        raise ValueError("mobilenet_v2_to_deeplab_backbone: no 'features.*' entries: not a torchvision MobileNetV2")
    return out


_SMP_MARKERS = ("segmentation_head.0.weight", "decoder.block1.0.weight")
_SMP_RULES = [
    (re.compile(r"^encoder\.(.+)$"), lambda m: f"backbone.{m.group(1)}"),
    (re.compile(r"^decoder\.aspp\.0\.convs\.([1-3])\.0\.0\.weight$"), lambda m: f"aspp.convs.{m.group(1)}.depthwise.weight"),
    (re.compile(r"^decoder\.aspp\.0\.convs\.([1-3])\.0\.1\.(weight|bias)$"),
     lambda m: f"aspp.convs.{m.group(1)}.pointwise.{m.group(2)}"),
    (re.compile(r"^decoder\.aspp\.0\.convs\.([1-3])\.1\.(\w+)$"), lambda m: f"aspp.convs.{m.group(1)}.pointwise_bn.{m.group(2)}"),
    (re.compile(r"^decoder\.aspp\.0\.((?:convs\.[04]|project)\.\d+\.\w+)$"), lambda m: f"aspp.{m.group(1)}"),
    (re.compile(r"^decoder\.aspp\.1\.0\.weight$"), lambda m: "aspp_conv.depthwise.weight"),
    (re.compile(r"^decoder\.aspp\.1\.1\.(weight|bias)$"), lambda m: f"aspp_conv.pointwise.{m.group(1)}"),
    (re.compile(r"^decoder\.aspp\.2\.(\w+)$"), lambda m: f"aspp_conv.pointwise_bn.{m.group(1)}"),
    (re.compile(r"^decoder\.block1\.(\d+\.\w+)$"), lambda m: f"low_level.{m.group(1)}"),
    (re.compile(r"^decoder\.block2\.0\.0\.weight$"), lambda m: "decoder.0.depthwise.weight"),
    (re.compile(r"^decoder\.block2\.0\.1\.(weight|bias)$"), lambda m: f"decoder.0.pointwise.{m.group(1)}"),
    (re.compile(r"^decoder\.block2\.1\.(\w+)$"), lambda m: f"decoder.0.pointwise_bn.{m.group(1)}"),
    (re.compile(r"^segmentation_head\.0\.(weight|bias)$"), lambda m: f"classifier.{m.group(1)}"),
]


def is_smp_deeplabv3plus(state_dict: Mapping) -> bool:
    """Whether the keys are segmentation_models_pytorch's ``DeepLabV3Plus`` (``segmentation_head.0.weight`` and
    ``decoder.block1.0.weight``)."""
    return all(k in state_dict for k in _SMP_MARKERS)


def convert_smp_deeplabv3plus(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """segmentation_models_pytorch 0.6.0 ``DeepLabV3Plus`` key names -> ``DeepLabV3Plus(flavor="smp")``'s
    (tensors shared). The map (i = 1..3):

    ===============================================  ==========================================
    smp                                              ``DeepLabV3Plus(flavor="smp")``
    ===============================================  ==========================================
    ``encoder.*``                                    ``backbone.*``
    ``decoder.aspp.0.convs.{0,4}.*``, ``.project.*``  ``aspp.convs.{0,4}.*``, ``aspp.project.*``
    ``decoder.aspp.0.convs.{i}.0.0`` / ``.0.1``      ``aspp.convs.{i}.depthwise`` / ``.pointwise``
    ``decoder.aspp.0.convs.{i}.1``                   ``aspp.convs.{i}.pointwise_bn``
    ``decoder.aspp.1.0`` / ``.1.1``, ``.2``          ``aspp_conv.depthwise`` / ``.pointwise``, ``.pointwise_bn``
    ``decoder.block1.*``                             ``low_level.*``
    ``decoder.block2.0.0`` / ``.0.1``, ``.1``        ``decoder.0.depthwise`` / ``.pointwise``, ``.pointwise_bn``
    ``segmentation_head.0.*``                        ``classifier.*``
    ===============================================  ==========================================

    smp's optional classification head (``aux_params``) has no counterpart: ValueError, as for any other key no
    rule maps."""
    _check_state_dict(state_dict, "convert_smp_deeplabv3plus")
    return _rename(state_dict, _SMP_RULES, "convert_smp_deeplabv3plus",
                   "segmentation_models_pytorch DeepLabV3Plus names (without aux_params)")


def smp_deeplabv3plus_foreign(state_dict: Mapping, kwargs: dict) -> Mapping:
    """The registry's ``foreign`` hook of the DeepLab v3+ models: an smp ``DeepLabV3Plus`` state dict is
    converted (``convert_smp_deeplabv3plus``) when the model is built with ``flavor="smp"`` and an explicit
    ``output_stride`` (smp's state dicts do not record the encoder's output stride, and both strides have the
    same tensors); ValueError otherwise. Other state dicts pass unchanged."""
    if not is_smp_deeplabv3plus(state_dict):
        return state_dict
    if kwargs.get("flavor") != "smp" or kwargs.get("output_stride") is None:
        raise ValueError("these are segmentation_models_pytorch DeepLabV3Plus weights: build the model with "
                         "flavor='smp' and the output_stride they were trained with (smp's "
                         "encoder_output_stride, 16 or 8: its state dicts do not record it), e.g. "
                         "get_model(name, weights=path, flavor='smp', output_stride=16); got "
                         f"flavor={kwargs.get('flavor')!r}, output_stride={kwargs.get('output_stride')!r}")
    return convert_smp_deeplabv3plus(state_dict)
