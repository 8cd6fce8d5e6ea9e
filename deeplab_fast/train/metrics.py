"""Segmentation metrics from a confusion matrix: mean IoU (the PASCAL VOC measure), pixel accuracy and mean class
accuracy.

Sources: Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010, sec. 4.3 / the VOC devkit's
``VOCevalseg.m`` (IoU = TP / (TP + FP + FN) per class from the accumulated confusion matrix, over the whole set,
"void" (255) pixels excluded); Long et al., "Fully Convolutional Networks", CVPR 2015, sec. 5 (pixel accuracy,
mean accuracy, mean IU); the DeepLab papers report the VOC mean IoU.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """An exact int64 [L, L] confusion matrix, rows = ground truth, columns = prediction, accumulated over a
    whole evaluation set (not per image: the VOC measure).

    ``ConfusionMatrix(num_classes, ignore_index=255, device=None)``: ``device`` is where the matrix lives
    (put it on the GPU for NCCL's ``all_reduce``); ``update`` moves its inputs there.

    Convention for the averages: ``miou`` is the mean IoU over the classes whose union (TP + FP + FN) is > 0,
    i.e. the classes present in the ground truth or the predictions (``nanmean`` of ``per_class_iou``, as the
    common VOC evaluation code); on the full VOC val set every class is present, so it equals the devkit's mean
    over all 21 classes. A class absent from both counts neither for nor against. ``mean_class_accuracy``
    averages TP / (TP + FN) over the classes present in the ground truth.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ValueError(f"ConfusionMatrix: ignore_index must be an int, got {ignore_index!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """The int64 Tensor[L, L] counts (rows = ground truth, columns = prediction); the live tensor."""
        return self._mat

    @property
    def device(self) -> torch.device:
        return self._mat.device

    def reset(self) -> "ConfusionMatrix":
        self._mat.zero_()
        return self

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """Counts the pixels of ``pred`` / ``target``: integer tensors of the same shape (any batch shape, e.g.
        [B, H, W] labels from ``logits.argmax(1)``). Pixels with ``target == ignore_index`` are skipped.
        ValueError for non-integer tensors, different shapes, target values outside [0, L) other than
        ``ignore_index``, or prediction values outside [0, L) (at any pixel). Checking the ranges synchronises
        with the device once per call."""
        L = self.num_classes
        for name, t in (("pred", pred), ("target", target)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"ConfusionMatrix.update: {name} must be an integer tensor, got {got}")
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        pred = pred.reshape(-1).to(device=self._mat.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self._mat.device, dtype=torch.int64)
        valid = target != self.ignore_index
        bad_t = valid & ((target < 0) | (target >= L))
        bad_p = (pred < 0) | (pred >= L)
        n_bad_t, n_bad_p = (int(v) for v in torch.stack([bad_t.sum(), bad_p.sum()]).tolist())
        if n_bad_t:
            vals = torch.unique(target[bad_t])[:8].tolist()
            raise ValueError(f"ConfusionMatrix.update: target has {n_bad_t} values outside [0, {L}) that are not "
                             f"ignore_index={self.ignore_index}, e.g. {vals}")
        if n_bad_p:
            vals = torch.unique(pred[bad_p])[:8].tolist()
            raise ValueError(f"ConfusionMatrix.update: pred has {n_bad_p} values outside [0, {L}), e.g. {vals}")
        idx = target[valid] * L + pred[valid]
        self._mat += torch.bincount(idx, minlength=L * L).view(L, L)
        return self

    # --- combining -------------------------------------------------------------------------------------------
    def _check_compatible(self, other, owner: str) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise ValueError(f"ConfusionMatrix.{owner}: other must be a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(f"ConfusionMatrix.{owner}: num_classes / ignore_index differ: "
                             f"({self.num_classes}, {self.ignore_index}) vs ({other.num_classes}, "
                             f"{other.ignore_index})")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Adds ``other``'s counts into this matrix (in place); returns self."""
        self._check_compatible(other, "merge")
        self._mat += other._mat.to(self._mat.device)
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """A new matrix with both counts."""
        self._check_compatible(other, "__add__")
        out = ConfusionMatrix(self.num_classes, self.ignore_index, device=self._mat.device)
        out._mat = self._mat + other._mat.to(self._mat.device)
        return out

    def all_reduce(self) -> "ConfusionMatrix":
        """Sums the matrix over all processes (``torch.distributed.all_reduce``, SUM) when torch.distributed is
        initialised; a no-op otherwise. Call it once, after the last ``update`` of every process (a second call
        would count everything again). With the NCCL backend the matrix must be on the GPU (``device=``)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._mat, op=dist.ReduceOp.SUM)
        return self

    # --- measures (float64, from the exact counts) -------------------------------------------------------------
    def _stats(self):
        m = self._mat.double().cpu()
        tp = m.diagonal()
        return m, tp, m.sum(1), m.sum(0)  # counts, TP, ground-truth totals (TP + FN), predicted (TP + FP)

    def per_class_iou(self) -> torch.Tensor:
        """Tensor[L] float64 (CPU): TP / (TP + FP + FN) per class; NaN where the union is 0 (the class is in
        neither the ground truth nor the predictions)."""
        _, tp, gt, pr = self._stats()
        return _ratio(tp, gt + pr - tp)

    def miou(self) -> float:
        """Mean IoU over the classes with union > 0 (NaN when nothing has been counted)."""
        return _nanmean(self.per_class_iou())

    def pixel_accuracy(self) -> float:
        """Correct / counted pixels (NaN when nothing has been counted)."""
        m, tp, _, _ = self._stats()
        total = m.sum()
        return float(tp.sum() / total) if total > 0 else math.nan

    def per_class_accuracy(self) -> torch.Tensor:
        """Tensor[L] float64: TP / (TP + FN) per class (recall); NaN for classes absent from the ground truth."""
        _, tp, gt, _ = self._stats()
        return _ratio(tp, gt)

    def mean_class_accuracy(self) -> float:
        """Mean of ``per_class_accuracy`` over the classes present in the ground truth (NaN when none)."""
        return _nanmean(self.per_class_accuracy())

    def summary(self) -> Dict:
        """``{"miou", "pixel_accuracy", "mean_class_accuracy": float, "per_class_iou": list of float (NaN for
        absent classes)}``."""
        return {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy(),
                "mean_class_accuracy": self.mean_class_accuracy(),
                "per_class_iou": [float(v) for v in self.per_class_iou()]}

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"pixels={int(self._mat.sum())}, miou={self.miou():.4f})")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per class, NaN where den is 0."""
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    """The mean over the non-NaN entries (NaN when there are none)."""
    present = ~torch.isnan(values)
    return float(values[present].mean()) if present.any() else math.nan
