"""``DenseCRF``: the fully connected CRF as a post-processing layer for segmentation logits, or, with
``trainable=True``, as a CRF-as-RNN head whose compatibilities are learned end to end."""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dense_crf import (NO_NORMALIZATION, NORMALIZE_AFTER, NORMALIZE_BEFORE, NORMALIZE_SYMMETRIC, dense_crf,
                              dense_crf_features)

__all__ = ["DenseCRF", "CRFPreset", "PRESETS", "TRAINABLE_TERMS", "COMPAT_FORMS", "NORMALIZATIONS",
           "ONNX_EXPORT_ERROR"]

# What exporting a model with the CRF layer to ONNX raises (torch.export keeps the deeplab_fast ops, which run
# wherever deeplab_fast is imported; ONNX has no permutohedral-lattice operator).
ONNX_EXPORT_ERROR = (
    "DenseCRF cannot be exported to ONNX: the dense CRF (deeplab_fast::dense_crf, a permutohedral-lattice mean-field "
    "op) has no ONNX operator. Export the network without the CRF layer (torch.onnx.export(network, (x,), "
    "dynamo=True)), run it in onnxruntime, and run the CRF on its logits in Python: "
    "deeplab_fast.nn.DenseCRF(...)(torch.from_numpy(logits), image) or deeplab_fast.ops.dense_crf (on the CPU or "
    "CUDA). torch.export keeps the CRF as a deeplab_fast op (the program runs where deeplab_fast is imported).")


def _in_onnx_export() -> bool:
    """Whether torch.onnx.export is capturing the model. Its second capture strategy (torch.export with
    strict=True, i.e. dynamo) folds ``torch.onnx.is_in_onnx_export()`` to False, so the exporter's own flag is
    read too (a module global, read at trace time)."""
    if torch.onnx.is_in_onnx_export():
        return True
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


# The kernel normalisations, by name, with pydensecrf's NormalizationType numbers (which DenseCRF also takes).
NORMALIZATIONS = {"none": NO_NORMALIZATION, "before": NORMALIZE_BEFORE, "after": NORMALIZE_AFTER,
                  "symmetric": NORMALIZE_SYMMETRIC}


@dataclass(frozen=True)
class CRFPreset:
    """Dense CRF kernel settings. Standard deviations are in pixels (sxy) and 8-bit intensity levels (srgb)."""

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    source: str


PRESETS = {
    # pydensecrf's README and examples/inference.py (the values most scripts copy).
    "pydensecrf": CRFPreset(10, 3.0, 3.0, 80.0, 13.0, 10.0,
                            "pydensecrf README: addPairwiseGaussian(sxy=3, compat=3), "
                            "addPairwiseBilateral(sxy=80, srgb=13, compat=10)"),
    # DeepLab-v2 on PASCAL VOC 2012 (Chen et al., TPAMI 2017, sec. 4.1, cross-validated kernels), as used by
    # kazuto1011/deeplab-pytorch configs/voc12.yaml: POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3.
    "deeplab_v2_voc": CRFPreset(10, 1.0, 3.0, 67.0, 3.0, 4.0,
                                "DeepLab-v2 VOC (kazuto1011/deeplab-pytorch configs/voc12.yaml CRF section)"),
}


# The compatibilities a trainable layer can learn, and the kernel settings it cannot (the op has no gradient for
# them).
TRAINABLE_TERMS = ("gaussian_compat", "bilateral_compat")
_BANDWIDTHS = ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb")
COMPAT_FORMS = ("potts", "matrix")


def _trained_terms(trainable, owner: str = "DenseCRF", terms: tuple = TRAINABLE_TERMS,
                   bandwidths: tuple = _BANDWIDTHS) -> tuple:
    """``trainable`` (a bool, a term name or a sequence of them) as a tuple of term names, checked. Shared by
    the 2-D and 3-D layers (``owner`` names the layer in the messages, ``bandwidths`` its kernel widths)."""
    if isinstance(trainable, bool):
        return terms if trainable else ()
    names = (trainable,) if isinstance(trainable, str) else trainable
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"{owner}: trainable must be a bool or term names from {terms}, got "
                         f"{trainable!r}") from None
    for name in names:
        if name in bandwidths:
            raise NotImplementedError(
                f"{owner}: learning {name} (a kernel bandwidth) is not implemented: the dense CRF op has no "
                f"gradient with respect to the kernel features; only {' and '.join(terms)} can be trained")
        if name not in terms:
            raise ValueError(f"{owner}: trainable names must be among {terms} (iterations is an integer; "
                             f"the bandwidths have no gradient), got {name!r}")
    return tuple(t for t in terms if t in names)


def _check_compat_form(compat: str, trained: tuple, num_classes, owner: str = "DenseCRF") -> None:
    """The learned compatibilities' form (``compat``) and ``num_classes``, checked as the 2-D layer does."""
    if compat not in COMPAT_FORMS:
        raise ValueError(f"{owner}: compat must be one of {COMPAT_FORMS}, got {compat!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"{owner}: num_classes must be a positive int, got {num_classes!r}")
    if compat == "matrix":
        if not trained:
            raise ValueError(f"{owner}: compat='matrix' is the form of the learned compatibilities; it needs "
                             "trainable=True")
        if num_classes is None:
            raise ValueError(f"{owner}: compat='matrix' needs num_classes (the [L, L] matrices' size)")


def _compat_parameter(value, name: str, compat: str, num_classes, owner: str = "DenseCRF") -> nn.Parameter:
    """A learned compatibility initialised from a Potts weight: a 0-d parameter ``w`` ("potts") or ``-w * I``
    ("matrix"), which give the same messages."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: the initial {name} of a trainable layer must be a finite number (a "
                         f"Potts weight), got {value!r}")
    w = torch.tensor(float(value), dtype=torch.float32)
    return nn.Parameter(w if compat == "potts" else -w * torch.eye(num_classes))


def _check_layer_inputs(owner: str, logits, image, image_name: str, logits_layout: str, image_layout: str) -> None:
    """The CRF layers' input checks: tensors, of the layouts' dimensions, floating-point logits."""
    if not isinstance(logits, torch.Tensor) or not isinstance(image, torch.Tensor):
        raise ValueError(f"{owner} expects tensors: logits {logits_layout} and {image_name} {image_layout}, got "
                         f"{type(logits).__name__} and {type(image).__name__}")
    dims = logits_layout.count(",") + 1
    if logits.dim() != dims or image.dim() != dims:
        raise ValueError(f"{owner} expects {dims}-D logits {logits_layout} and {image_name} {image_layout}, got "
                         f"shapes {tuple(logits.shape)} and {tuple(image.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{owner}: logits must be floating point, got {logits.dtype}")


def _normalization_name(normalization) -> str:
    """``normalization`` (a name of NORMALIZATIONS, or pydensecrf's number 0-3) as its name, checked."""
    if isinstance(normalization, str):
        if normalization in NORMALIZATIONS:
            return normalization
    elif isinstance(normalization, numbers.Integral) and not isinstance(normalization, bool):
        for name, number in NORMALIZATIONS.items():
            if int(normalization) == number:
                return name
    raise ValueError(f"DenseCRF: normalization must be one of {tuple(NORMALIZATIONS)} or pydensecrf's "
                     f"NO_NORMALIZATION / NORMALIZE_BEFORE / NORMALIZE_AFTER / NORMALIZE_SYMMETRIC (0-3), got "
                     f"{normalization!r}")


class DenseCRF(nn.Module):
    """Fully connected CRF refinement of segmentation logits (Krähenbühl & Koltun, NIPS 2011), as used by
    DeepLab v1/v2 (Chen et al., ICLR 2015, sec. 4; TPAMI 2017, sec. 3.3), and, with ``trainable=True``, as a
    CRF-as-RNN head trained end to end with the network (Zheng et al., "Conditional Random Fields as Recurrent
    Neural Networks", ICCV 2015).

    The unary is ``-log_softmax(logits)``; logits smaller than the image (e.g. DeepLab's 1/8-resolution output)
    are first upsampled bilinearly (``align_corners=False``) to the image size. Mean-field inference runs on
    the permutohedral lattice through :func:`deeplab_fast.ops.dense_crf`, on the logits' device, in float32
    (autocast is turned off inside the layer).

    Args:
        iterations (int): mean-field steps (default 10).
        gaussian_sxy (float): smoothness kernel standard deviation, pixels (default 3).
        gaussian_compat (float): its Potts weight (default 3).
        bilateral_sxy (float): appearance kernel spatial standard deviation, pixels (default 80).
        bilateral_srgb (float): its colour standard deviation, 8-bit levels (default 13).
        bilateral_compat (float): its Potts weight (default 10).
        trainable (bool | str | sequence of str): learn the compatibilities (keyword only; default False).
            ``True`` learns both, or name them: ``"gaussian_compat"``, ``"bilateral_compat"``. The bandwidths
            (``gaussian_sxy``, ``bilateral_sxy``, ``bilateral_srgb``) cannot be learned: naming one raises
            ``NotImplementedError``.
        compat (str): the form of the learned compatibilities: ``"potts"`` (one weight per term, a 0-d
            parameter) or ``"matrix"`` (a full ``[L, L]`` label compatibility per term, as CRF-as-RNN learns).
        num_classes (int): L, needed for ``compat="matrix"``.
        checkpoint (bool): in training, keep only the inputs between forward and backward and recompute the
            iterations in the backward (see Memory).
        normalization (str | int): how both kernels are normalised (keyword only; default ``"symmetric"``),
            pydensecrf's choices: ``"symmetric"`` (``NORMALIZE_SYMMETRIC``, 3: ``1 / sqrt(K 1)`` on both sides of the
            filter; pydensecrf's ``DenseCRF2D`` default and DeepLab's), ``"after"`` (``NORMALIZE_AFTER``, 2:
            ``1 / (K 1)`` after filtering, the NIPS 2011 paper's and CRF-as-RNN's model), ``"before"``
            (``NORMALIZE_BEFORE``, 1) or ``"none"`` (``NO_NORMALIZATION``, 0). The numbers are pydensecrf's
            ``NormalizationType`` (``deeplab_fast.ops.NORMALIZE_AFTER``, ``deeplab_fast.densecrf.NORMALIZE_AFTER``).

    Defaults are pydensecrf's; ``DenseCRF.from_preset("deeplab_v2_voc")`` gives DeepLab-v2's VOC kernels, and
    ``DenseCRF.from_preset("deeplab_v2_voc", trainable=True, compat="matrix", num_classes=21)`` a CRF-as-RNN
    head initialised from them. CRF-as-RNN (Zheng et al., ICCV 2015; crfasrnn_pytorch) normalises each kernel
    after filtering: ``DenseCRF(..., normalization="after")`` is its model.

    What is learned (``trainable``): each trained term's compatibility becomes an ``nn.Parameter`` of the same
    name, initialised from the given (preset) weight. With the op's convention (pydensecrf's) the mean-field
    update is ``Q <- softmax(-unary - sum_k C_k(K_k Q))`` and a Potts weight ``w`` means ``C(x) = -w x``:
    ``"potts"`` learns ``w`` (positive: neighbours agree); ``"matrix"`` learns ``W`` with ``C(x) = W x``,
    initialised to ``-w * I`` (which gives exactly the Potts layer's output). The op uses ``(W + W^T) / 2``, so
    the gradient of ``W`` is symmetric and ``W`` stays symmetric; a negative ``W[i, j]`` makes label ``j``
    around a pixel favour label ``i`` there (CRF-as-RNN's compatibility transform, its sign as pydensecrf's
    ``MatrixCompatibility``). The kernel bandwidths and the number of iterations stay fixed; CRF-as-RNN
    trains with 5 iterations and tests with 10, which ``iterations`` allows. Gradients flow to the logits too
    (exact, through every mean-field step: the op's backward), so the network below the layer trains with it.

    Memory (training, ``checkpoint=False``): the op keeps every iteration's marginals for the backward,
    ``B * iterations * H * W * S`` float32 values, S being L rounded up to 8 on the CPU (for L > 2) and to 4 on
    CUDA: 252 MB for one 512x512 image with 21 labels (S = 24) and 10 iterations, plus the upsampled unary and
    the output (2 * 22 MB there). ``checkpoint=True`` keeps only the inputs until the backward, which reruns
    the iterations (one more forward's time) and holds the history only while it runs. In inference (no
    gradient needed) nothing is kept.

    Shape:
        - logits (Tensor[B, L, h, w], floating point), with h <= H and w <= W;
        - image (Tensor[B, 3, H, W], uint8 RGB) on the same device;
        - output (Tensor[B, L, H, W], float32): the CRF marginals (probabilities summing to 1 over L). To train
          with a cross-entropy, use ``log(Q + eps)`` as the scores (``deeplab_fast.train.CRFasRNNHead`` does).

    Raises:
        ValueError: non-tensor inputs, non-floating logits, logits larger than the image, a non-4-D input; bad
            constructor arguments (``compat``, ``num_classes``, ``trainable`` names), logits with another number
            of classes than a ``"matrix"`` layer's ``num_classes``.
        NotImplementedError: ``trainable`` naming a bandwidth.
        ValueError, RuntimeError: those of :func:`deeplab_fast.ops.dense_crf` (dtype, batch size, channels...;
            NaN in the unary).

    With ``trainable=False`` (the default) the layer has no parameters and is post-processing: it runs under
    ``no_grad``. A trainable layer works inside a model's ``forward`` and under ``torch.compile(fullgraph=True)``,
    moves with ``.to(device)``, and its ``state_dict`` holds the learned compatibilities.
    """

    def __init__(self, iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
                 bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0, *,
                 trainable=False, compat: str = "potts", num_classes: Optional[int] = None,
                 checkpoint: bool = False, normalization="symmetric"):
        super().__init__()
        trained = _trained_terms(trainable)
        self.normalization = _normalization_name(normalization)
        _check_compat_form(compat, trained, num_classes)
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.trained = trained
        self.compat = compat
        self.num_classes = num_classes
        self.checkpoint = bool(checkpoint)
        self._init_compat = dict(gaussian_compat=gaussian_compat, bilateral_compat=bilateral_compat)
        for name, value in self._init_compat.items():
            setattr(self, name, _compat_parameter(value, name, compat, num_classes) if name in trained else value)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DenseCRF":
        """A ``DenseCRF`` with the named kernel settings (see ``PRESETS``), optionally overriding some or passing
        ``trainable``, ``compat``, ``num_classes``, ``checkpoint``, ``normalization``."""
        if name not in PRESETS:
            raise ValueError(f"unknown DenseCRF preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = {k: v for k, v in asdict(PRESETS[name]).items() if k != "source"}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def trainable(self) -> bool:
        """Whether the layer learns any compatibility."""
        return bool(self.trained)

    def config(self) -> dict:
        """The constructor's arguments (``DenseCRF(**crf.config())`` is the same layer before training; the learned
        values are in the ``state_dict``)."""
        return dict(iterations=self.iterations, gaussian_sxy=self.gaussian_sxy, bilateral_sxy=self.bilateral_sxy,
                    bilateral_srgb=self.bilateral_srgb, **self._init_compat, trainable=list(self.trained),
                    compat=self.compat, num_classes=self.num_classes, checkpoint=self.checkpoint,
                    normalization=self.normalization)

    def _compat_repr(self, name: str) -> str:
        value = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            return f"{name}={value}"
        if value.dim() == 0:
            return f"{name}={float(value.detach()):.6g} (learned)"
        return f"{name}=matrix{list(value.shape)} (learned, initial Potts {self._init_compat[name]})"

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, gaussian_sxy={self.gaussian_sxy}, "
                f"{self._compat_repr('gaussian_compat')}, bilateral_sxy={self.bilateral_sxy}, "
                f"bilateral_srgb={self.bilateral_srgb}, {self._compat_repr('bilateral_compat')}"
                + (f", compat={self.compat!r}" if self.trained else "")
                + (f", num_classes={self.num_classes}" if self.num_classes is not None else "")
                + (", checkpoint=True" if self.checkpoint else "")
                + (f", normalization={self.normalization!r}" if self.normalization != "symmetric" else ""))

    def unary(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The unary energies ``-log_softmax`` of the logits at image resolution, Tensor[B, L, H, W] float32."""
        _check_layer_inputs("DenseCRF", logits, image, "image", "[B, L, h, w]", "[B, 3, H, W] uint8")
        (h, w), (H, W) = logits.shape[-2:], image.shape[-2:]
        if h > H or w > W:
            raise ValueError(f"logits ({h}x{w}) are larger than the image ({H}x{W}); resize them first")
        logits = logits.float()
        if (h, w) != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return -F.log_softmax(logits, dim=1)

    def _infer(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        unary = self.unary(logits, image)
        if self.normalization == "symmetric":  # the image-level op: DenseCRF2D's defaults
            return dense_crf(unary, image, iterations=self.iterations,
                             gaussian_sxy=self.gaussian_sxy, gaussian_compat=self.gaussian_compat,
                             bilateral_sxy=self.bilateral_sxy, bilateral_srgb=self.bilateral_srgb,
                             bilateral_compat=self.bilateral_compat, checkpoint=self.checkpoint)
        # The same kernels (the features the image-level op builds) with another normalisation.
        features = torch.ops.deeplab_fast.dense_crf_image_features(image, float(self.gaussian_sxy),
                                                                   float(self.bilateral_sxy),
                                                                   float(self.bilateral_srgb))
        B, L, H, W = unary.shape
        norm = NORMALIZATIONS[self.normalization]
        q = dense_crf_features(unary.reshape(B, L, H * W), list(features),
                               [self.gaussian_compat, self.bilateral_compat], [norm, norm],
                               iterations=self.iterations, checkpoint=self.checkpoint)
        return q.reshape(B, L, H, W)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if _in_onnx_export():
            raise RuntimeError(ONNX_EXPORT_ERROR)
        if not self.trained:
            with torch.no_grad():
                return self._infer(logits, image)
        if self.compat == "matrix" and isinstance(logits, torch.Tensor) and logits.dim() == 4 \
                and logits.shape[1] != self.num_classes:
            raise ValueError(f"DenseCRF: the logits have {logits.shape[1]} classes, the layer's compatibility "
                             f"matrices {self.num_classes}")
        device_type = logits.device.type if isinstance(logits, torch.Tensor) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self._infer(logits, image)
