"""Pixel-wise cross-entropy losses of the DeepLab family.

Sources: Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs" (v1),
ICLR 2015, sec. 4.1 ("we subsample the ground truth by 8 during training"), and "DeepLab: ..." (v2), TPAMI 2017,
sec. 4.1 and sec. 3.2 (multi-scale inputs, max fusion, MSC training), whose Caffe models compute the softmax loss
at the 1/8 score resolution on a downsampled label map (the ``Interp`` layer with ``shrink_factor: 8`` on the
labels); kazuto1011/deeplab-pytorch's ``main.py`` (``resize_labels`` with nearest interpolation, the losses of
the [1x, 0.5x, 0.75x, max] outputs summed). Chen et al., "Rethinking Atrous Convolution ..." (v3),
arXiv:1706.05587, sec. 4.1: "we upsample the output ... during training" (torchvision's reference recipe).

All losses are the mean over the non-ignored pixels (``ignore_index``, 255 in VOC: the object boundaries and
"void"), and 0 — a zero connected to the graph, so that ``backward`` still runs — when every pixel is ignored,
where ``F.cross_entropy`` would give NaN. The mean is computed as ``sum / count`` without a host
synchronisation. Label values outside [0, L) other than ``ignore_index`` make ``F.cross_entropy`` raise (CPU) or
trip a device assert (CUDA): they are not checked here, to keep the training step free of synchronisations.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["downsampled_cross_entropy", "upsampled_cross_entropy", "msc_loss", "resize_labels"]


def _check(logits, target, owner: str, logits_name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        got = (f"{logits.dim()}-D {logits.dtype} with shape {tuple(logits.shape)}"
               if isinstance(logits, torch.Tensor) else type(logits).__name__)
        raise ValueError(f"{owner}: {logits_name} must be a floating-point Tensor[B, L, h, w], got {got}")
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.is_floating_point() \
            or target.dtype == torch.bool or target.is_complex():
        got = (f"{target.dim()}-D {target.dtype} with shape {tuple(target.shape)}"
               if isinstance(target, torch.Tensor) else type(target).__name__)
        raise ValueError(f"{owner}: target must be an integer Tensor[B, H, W], got {got}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"{owner}: {logits_name} has batch {logits.shape[0]}, target batch {target.shape[0]}")
    if logits.shape[1] < 1 or min(logits.shape[-2:]) < 1 or min(target.shape[-2:]) < 1:
        raise ValueError(f"{owner}: empty {logits_name} {tuple(logits.shape)} or target {tuple(target.shape)}")


def resize_labels(target: torch.Tensor, size) -> torch.Tensor:
    """Tensor[B, H, W] integer labels -> int64 Tensor[B, h, w] by nearest neighbour: ``F.interpolate(...,
    mode="nearest")``, which picks source row ``floor(i * H / h)`` and column ``floor(j * W / w)`` (exact for
    labels < 2^24, which go through float32). Caffe's ``Interp`` layer (DeepLab v1 / v2) samples
    ``i * (H - 1) / (h - 1)`` instead (align-corners style), a fraction of a source pixel away; kazuto1011's
    PyTorch port resizes with PIL's nearest (pixel centres, ``floor((i + 0.5) * H / h)``). The three agree up to
    one source pixel."""
    size = tuple(int(s) for s in size)
    if tuple(target.shape[-2:]) == size:
        return target.long()
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _mean_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp_min(1)
    return total / count.to(total.dtype)


def downsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of the scores at the network's output stride against the labels downsampled to them.

    logits: Tensor[B, L, h, w] floating point (e.g. ``model.forward_logits(x)``, NOT upsampled); target:
    integer Tensor[B, H, W] (int64 preferred), values in [0, L) or ``ignore_index``. The target is resized to
    (h, w) by nearest neighbour (``resize_labels``: source index ``floor(i * H / h)``; Caffe's Interp layer
    samples slightly differently, see there), then ``F.cross_entropy`` with ``ignore_index``: the mean over the
    non-ignored pixels of the small map, a 0-dim tensor; 0 (keeping the graph) when all are ignored.
    DeepLab v1 / v2 training (ICLR 2015 sec. 4.1, TPAMI 2017 sec. 4.1). ValueError on bad shapes / dtypes.
    """
    _check(logits, target, "downsampled_cross_entropy")
    small = resize_labels(target, logits.shape[-2:])
    return _mean_ce(logits, small, ignore_index)


def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of the scores bilinearly upsampled (``align_corners=False``) to the label size.

    logits: Tensor[B, L, h, w] floating point; target: integer Tensor[B, H, W]. The DeepLab v3 / torchvision
    convention (arXiv:1706.05587 sec. 4.1); passing the model's full-size output (h, w = H, W) skips the
    resize. Mean over non-ignored pixels, 0 (keeping the graph) when all are ignored. ValueError on bad
    shapes / dtypes.
    """
    _check(logits, target, "upsampled_cross_entropy")
    if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return _mean_ce(logits, target.long(), ignore_index)


def msc_loss(outputs_per_scale: Sequence[torch.Tensor], fused: Optional[torch.Tensor], target: torch.Tensor,
             ignore_index: int = 255, downsample: bool = True) -> torch.Tensor:
    """DeepLab v2 multi-scale (MSC) training loss: the sum of the losses of each scale's scores and of the
    max-fused scores, each against the target resized to its own size (TPAMI 2017 sec. 3.2 / 4.1;
    kazuto1011's ``main.py`` sums the [1x, 0.5x, 0.75x, max] losses).

    outputs_per_scale: a list / tuple of Tensor[B, L, h_s, w_s] (any number, any sizes; e.g. the first entries
    of ``DeepLabV2.msc_logits(x)``); fused: Tensor[B, L, h, w] (its last entry) or None to leave it out;
    target: integer Tensor[B, H, W]. ``downsample=True``: ``downsampled_cross_entropy`` per term (DeepLab v2);
    False: ``upsampled_cross_entropy``. Returns a 0-dim tensor. ValueError naming the argument on a bad input
    or when no scores are given at all.
    """
    if isinstance(outputs_per_scale, torch.Tensor) or not isinstance(outputs_per_scale, (list, tuple)):
        raise ValueError(f"msc_loss: outputs_per_scale must be a list or tuple of Tensor[B, L, h, w], got "
                         f"{type(outputs_per_scale).__name__}")
    terms = [(f"outputs_per_scale[{i}]", t) for i, t in enumerate(outputs_per_scale)]
    if fused is not None:
        terms.append(("fused", fused))
    if not terms:
        raise ValueError("msc_loss: no scores: outputs_per_scale is empty and fused is None")
    num_classes = None
    for name, t in terms:
        _check(t, target, "msc_loss", name)
        if num_classes is None:
            num_classes = t.shape[1]
        elif t.shape[1] != num_classes:
            raise ValueError(f"msc_loss: {name} has {t.shape[1]} classes, {terms[0][0]} has {num_classes}")
    loss_fn = downsampled_cross_entropy if downsample else upsampled_cross_entropy
    total = None
    for _, t in terms:
        loss = loss_fn(t, target, ignore_index=ignore_index)
        total = loss if total is None else total + loss
    return total
