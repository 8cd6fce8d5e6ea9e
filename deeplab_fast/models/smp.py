"""segmentation_models_pytorch 0.6.0's ``DeepLabV3Plus`` state dicts: recognised and converted to
``DeepLabV3Plus(flavor="smp")``'s key names (the registry's ``foreign`` hook of the v3+ models)."""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .weights import _check_state_dict, _rename

__all__ = ["is_smp_deeplabv3plus", "convert_smp_deeplabv3plus", "smp_deeplabv3plus_foreign"]

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
