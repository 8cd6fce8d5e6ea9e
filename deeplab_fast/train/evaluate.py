"""Evaluation as the DeepLab papers report it: mIoU, pixel accuracy and per-class IoU, from the softmax
probabilities at full resolution averaged over scales (and horizontal flips), and optionally again after the
dense CRF on those averaged probabilities. ``evaluate`` takes a loader, as torchvision's reference does, so any
dataset of (uint8 image, label map) pairs can be evaluated; :func:`evaluation_loader` makes one."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data.transforms import EvalTransform
from ..nn import DenseCRF
from .distributed import local_rank, process_group, resolve_device
from .metrics import ConfusionMatrix

__all__ = ["evaluate", "evaluation_loader"]


def evaluation_loader(dataset, workers: int = 0) -> DataLoader:
    """The loader :func:`evaluate` expects over ``dataset`` (untransformed pairs: uint8 Tensor[3, H, W] RGB and an
    integer Tensor[H, W], e.g. ``VOCSegmentation(root, "val")``): batch 1 (the images differ in size), in order;
    under DDP split by ``DistributedSampler`` (which pads the split to a multiple of the world size with
    repeats)."""
    sampler = DistributedSampler(dataset, shuffle=False) if process_group() is not None else None
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers)


def _metrics(cm: ConfusionMatrix) -> dict:
    def num(v):
        return float(v.item() if isinstance(v, torch.Tensor) else v)

    per_class = cm.per_class_iou()
    per_class = per_class.tolist() if isinstance(per_class, torch.Tensor) else [num(v) for v in per_class]
    return dict(miou=num(cm.miou()), pixel_accuracy=num(cm.pixel_accuracy()), per_class_iou=per_class)


def _probabilities(model: nn.Module, x: torch.Tensor, scales: Sequence[float], flip: bool) -> torch.Tensor:
    """The softmax probabilities of ``model`` on x (Tensor[1, 3, H, W]) averaged over the scales and flips,
    Tensor[1, L, H, W]."""
    size = x.shape[-2:]
    probs, n = None, 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            out = model(xs.flip(-1) if mirrored else xs)
            logits = (out["out"] if isinstance(out, dict) else out).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, num_classes: int, preprocessing: str, crf=None,
             scales: Sequence[float] = (1.0,), flip: bool = False, device="auto", progress: bool = True,
             ignore_index: int = 255) -> dict:
    """mIoU, pixel accuracy and per-class IoU of ``model`` on the pairs of ``loader``.

    ``loader`` yields (uint8 Tensor[B, 3, H, W] RGB, integer Tensor[B, H, W]) batches, untransformed (see
    :func:`evaluation_loader`). Each image is normalised by ``EvalTransform(preprocessing)`` and run whole at
    every scale in ``scales`` (bilinear resize, ``align_corners=False``), and mirrored too with ``flip``; the
    softmax probabilities, upsampled to the image size, are averaged. ``crf`` (a :data:`deeplab_fast.nn.PRESETS`
    name, or a ``DenseCRF``) refines those averaged probabilities (their log as logits) with the uint8 image, on
    the model's device (the CUDA op on the GPU). Under DDP the confusion matrices are all-reduced.

    Returns ``{"miou", "pixel_accuracy", "per_class_iou" (list, NaN for classes absent from both prediction
    and truth), "num_images", "crf": None or the same three metrics after the CRF, "crf_preset"}``. The model's
    training mode is restored afterwards. ValueError for scales that are not positive.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"evaluate: scales must be positive numbers, got {scales}")
    group = process_group()
    dev = resolve_device(device, local_rank())
    crf_layer = DenseCRF.from_preset(crf) if isinstance(crf, str) else crf
    transform = EvalTransform(preprocessing=preprocessing)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=dev)
    cm_crf = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=dev) if crf_layer is not None else None

    was_training = model.training
    model.to(dev).eval()
    show = progress and (group is None or group.get_rank() == 0)
    count = 0
    try:
        for images, targets in tqdm(loader, unit="img", disable=not show, dynamic_ncols=True,
                                    desc=getattr(getattr(loader, "dataset", None), "split", "eval")):
            for image_u8, target in zip(images, targets):
                x, target = transform(image_u8, target)
                probs = _probabilities(model, x.unsqueeze(0).to(dev), scales, flip)
                target = target.to(dev)
                cm.update(probs.argmax(dim=1)[0], target)
                if crf_layer is not None:
                    refined = crf_layer(probs.clamp_min(1e-8).log(), image_u8.unsqueeze(0).to(dev))
                    cm_crf.update(refined.argmax(dim=1)[0], target)
                count += 1
    finally:
        model.train(was_training)
    cm.all_reduce()
    result = _metrics(cm)
    result["num_images"] = count
    result["crf"] = None
    result["crf_preset"] = crf if isinstance(crf, str) else (None if crf is None else repr(crf))
    if cm_crf is not None:
        cm_crf.all_reduce()
        result["crf"] = _metrics(cm_crf)
    return result
