"""The CRF-as-RNN training stage: a trained DeepLab fine-tuned end to end with a trainable dense CRF on top
(Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015; the CRF as in DeepLab v1/v2,
Chen et al., ICLR 2015 / TPAMI 2017; gradients: the op's exact backward, see ``deeplab_fast.ops.dense_crf``).

- :class:`CRFasRNNStage`: what ``TrainConfig(extra_head=...)`` takes for this stage: the preset the CRF starts
  from, the form of its learned compatibilities (``"potts"`` or ``"matrix"``), its iterations and memory switch.
  Called with the model, it builds a :class:`CRFasRNNHead`.
- :class:`CRFasRNNHead`: ``head(output, x)``, called by the training loop on the network's training output and
  the normalised input batch: it undoes the normalisation (:func:`denormalize`) to get the uint8 RGB image the
  CRF's bilateral kernel needs, runs the trainable :class:`deeplab_fast.nn.DenseCRF` on the final scores and
  returns ``log(Q + eps)`` in their place, so that the family's cross-entropy loss is the CRF marginals'
  negative log-likelihood (and an argmax of it is the CRF's labels).
The trained layer comes back from a ``deeplab-fast train`` checkpoint with
:func:`deeplab_fast.train.load_trained_crf` (in ``checkpoint``, beside the other checkpoint readers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data.transforms import PREPROCESSING_CHOICES, denormalize
from ..nn import PRESETS, DenseCRF
from ..nn.crf import COMPAT_FORMS

__all__ = ["CRFasRNNStage", "CRFasRNNHead", "denormalize", "LOG_EPS"]

# Added to the marginals before the log: float32 marginals can underflow to 0 for a confident wrong label, whose
# loss is then log(1 / eps) (~13.8) instead of infinite. The gradient stays bounded: d loss / d Q_t = -1 / (Q_t +
# eps), multiplied by the softmax's Q_t in the op's backward.
LOG_EPS = 1e-6


class CRFasRNNHead(nn.Module):
    """The trainable CRF on top of a DeepLab in training: ``head(output, x) -> output`` of the same form.

    Args:
        crf (DenseCRF): a trainable :class:`deeplab_fast.nn.DenseCRF` (its parameters are the head's).
        preprocessing (str): the preprocessing of the input batch ``x`` ("torchvision" or "caffe"), undone with
            :func:`denormalize` to give the CRF its uint8 RGB image.
        eps (float): added to the marginals before the log (default :data:`LOG_EPS`).

    ``output`` is the network's training output: a Tensor[B, L, h, w] of scores (v1 / v2: the 1/8 scores), a
    list whose last entry is the fused scores (v2 MSC: ``[1x, 0.5x, 0.75x, max]``) or a dict with ``"out"``
    (v3). The CRF refines those final scores (upsampled to the input size) and ``log(Q + eps)``, Tensor[B, L,
    H, W] at the input's size, replaces them; the other entries (the MSC per-scale scores, v3's ``"aux"``) are
    kept, so their loss terms still supervise the network. The family's cross-entropy on ``log(Q + eps)`` is
    the negative log-likelihood of the CRF marginals at full resolution (``log_softmax`` of log-probabilities
    changes them by at most L x eps). The CRF runs in float32 outside autocast.
    """

    def __init__(self, crf: nn.Module, preprocessing: str, eps: float = LOG_EPS):
        super().__init__()
        if preprocessing not in PREPROCESSING_CHOICES:
            raise ValueError(f"CRFasRNNHead: preprocessing must be one of {PREPROCESSING_CHOICES}, got "
                             f"{preprocessing!r}")
        if not getattr(crf, "trainable", False):
            raise ValueError("CRFasRNNHead: the CRF must be trainable (DenseCRF(..., trainable=True))")
        self.crf = crf
        self.preprocessing = preprocessing
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"preprocessing={self.preprocessing!r}, eps={self.eps:g}"

    def refine(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``log(CRF(scores, image) + eps)``, Tensor[B, L, H, W] float32."""
        return torch.log(self.crf(scores, image) + self.eps)

    def forward(self, output, x: torch.Tensor):
        image = denormalize(x, self.preprocessing)
        if isinstance(output, dict):
            output = dict(output)
            output["out"] = self.refine(output["out"], image)
            return output
        if isinstance(output, (list, tuple)):
            output = list(output)
            output[-1] = self.refine(output[-1], image)
            return output
        return self.refine(output, image)


@dataclass(frozen=True)
class CRFasRNNStage:
    """The CRF-as-RNN stage of a training run, as ``TrainConfig(extra_head=CRFasRNNStage(...))``: a factory
    ``stage(model) -> CRFasRNNHead`` over ``DenseCRF.from_preset(preset, trainable=True, compat=compat,
    num_classes=model.num_classes, ...)``.

    Fields: ``preset`` (a :data:`deeplab_fast.nn.PRESETS` name: the kernels, and the Potts weights the
    compatibilities start from), ``compat`` ("potts": the two weights; "matrix": two [L, L] matrices, CRF-as-RNN's
    form), ``iterations`` (None: the preset's 10; CRF-as-RNN trains with 5), ``checkpoint`` (recompute the
    mean-field history in the backward instead of keeping it: see ``DenseCRF``), ``preprocessing`` (the input
    preprocessing to undo; None: the run's ``TrainConfig.preprocessing``, which the training engine fills in).
    The CRF's learning rate is ``TrainConfig.extra_head_lr``, its weight decay ``extra_head_weight_decay``.
    """

    preset: str = "deeplab_v2_voc"
    compat: str = "potts"
    iterations: Optional[int] = None
    checkpoint: bool = False
    preprocessing: Optional[str] = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"CRFasRNNStage: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.compat not in COMPAT_FORMS:
            raise ValueError(f"CRFasRNNStage: compat must be one of {COMPAT_FORMS}, got {self.compat!r}")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):
            raise ValueError(f"CRFasRNNStage: iterations must be a positive int or None, got {self.iterations!r}")

    def replace(self, **changes) -> "CRFasRNNStage":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build_crf(self, num_classes: int) -> nn.Module:
        """The trainable ``DenseCRF`` of this stage, at its initial (preset) values."""
        extra = {} if self.iterations is None else {"iterations": self.iterations}
        return DenseCRF.from_preset(self.preset, trainable=True, compat=self.compat, num_classes=num_classes,
                                    checkpoint=self.checkpoint, **extra)

    def __call__(self, model: nn.Module) -> CRFasRNNHead:
        if self.preprocessing is None:
            raise ValueError("CRFasRNNStage: the input preprocessing is not set; the training engine sets it from "
                             "TrainConfig.preprocessing, or give CRFasRNNStage(preprocessing=...)")
        num_classes = getattr(model, "num_classes", None)
        if not isinstance(num_classes, int):
            raise ValueError("CRFasRNNStage: the model has no num_classes attribute")
        return CRFasRNNHead(self.build_crf(num_classes), self.preprocessing)
