"""Where a training run starts from: pretrained weights loaded by name and shape (:func:`init_weights`), and the
input preprocessing they expect (:func:`resolve_preprocessing`)."""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from .. import models
from .checkpoint import read_training_checkpoint

__all__ = ["init_weights", "resolve_preprocessing"]


def resolve_preprocessing(model_name: str, preprocessing: Optional[str] = None, init=None) -> str:
    """``preprocessing`` if given; else that of the ``init`` weights (a ``deeplab-fast train`` checkpoint says
    which it was trained with; registered weights, or a file named as one, say theirs); else the model's
    default (its registration: "caffe" for v1/v2, "torchvision" for v3)."""
    if preprocessing is not None:
        return preprocessing
    if isinstance(init, (str, os.PathLike)) and os.path.isfile(init):
        try:
            saved = read_training_checkpoint(init)
        except (ValueError, OSError):
            saved = None
        if saved is not None and saved["args"].get("preprocessing") is not None:
            return saved["args"]["preprocessing"]
    if init is not None and not isinstance(init, dict):
        try:
            return models.resolve_weights(model_name, init).meta["normalization"]["preprocessing"]
        except (ValueError, OSError, KeyError, TypeError):
            pass
    return models.model_entry(model_name).default_preprocessing


def init_weights(model: nn.Module, init, model_name: Optional[str] = None) -> tuple:
    """Loads pretrained weights into ``model`` before training, as the paper recipes start: every tensor whose
    name and shape match the model's is copied, the rest (e.g. a classifier for other classes) keeps its
    initialisation.

    ``init``: a registered weights name of the model (``get_model_weights(model_name)``: e.g.
    ``"IMAGENET1K_BACKBONE"``, ``"COCO_WITH_VOC_LABELS_V1"``), a ``WeightsEnum`` member, a path or URL (a file
    named as a registered weights file gets that entry's key map, e.g. ``vgg16-397923af.pth`` into v1's
    ``features``), or a state dict in the model's key names. ``model_name`` defaults to ``model.arch``.
    Returns (tensors loaded, tensors in the model); ValueError when nothing matches.
    """
    if isinstance(init, (str, os.PathLike, models.WeightsEnum, models.Weights)):
        name = model_name or getattr(model, "arch", None)
        if name is None:
            raise ValueError("init_weights: give model_name (the model has no 'arch')")
        state = models.load_weights_state_dict(models.resolve_weights(name, init))
    else:
        state = dict(init)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ValueError("init: no tensor of the checkpoint matches the model by name and shape")
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)
