"""The DeepLab training augmentation and the input normalisations.

Sources: Chen et al., "DeepLab: ..." (v2), TPAMI 2017, sec. 4.1 (random scaling of the inputs, 0.5 to 1.5,
during training; 321x321 crops) and the released Caffe ``ImageSegData`` layer (random crop, mirror, padding the
image with the mean colour and the label with 255); Chen et al., "Rethinking Atrous Convolution ..." (v3),
arXiv:1706.05587, sec. 4.1 (scales 0.5 to 2.0, 513x513 crops, flips); kazuto1011/deeplab-pytorch's
``_augmentation`` (scale, pad bottom / right, crop, flip) and torchvision's segmentation reference.

The input preprocessing (``normalize``): ``preprocessing="torchvision"``: RGB / 255, minus the ImageNet mean, over
its std (torchvision's weights; the v3 models); ``preprocessing="caffe"``: BGR, 0-255, minus the Caffe mean
(104.008, 116.669, 122.675) (the Caffe-converted v1 / v2 weights). ``deeplab-fast segment`` / ``eval`` use the
same function.

Randomness comes from a generator given to the call (``transform(image, target, generator=g)``: the training
engine gives each sample its own, seeded from the run's seed, the epoch and the sample's index, so the draws do not
depend on the DataLoader workers), else the transform's ``generator`` (a ``torch.Generator``, or an int seed for
one), else torch's global generator — leave the transform's None with a multi-worker DataLoader, which seeds each
worker's global generator differently (a generator object would be copied into every worker and repeat the same
draws).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["TrainTransform", "EvalTransform", "normalize", "denormalize", "PREPROCESSING_CHOICES", "IMAGENET_MEAN",
           "IMAGENET_STD", "CAFFE_MEAN_BGR"]

# ImageNet normalisation (torchvision's DeepLabV3 weights) and the Caffe DeepLab v1/v2 preprocessing
# (BGR, 0-255, mean subtracted), as kazuto1011/deeplab-pytorch feeds its converted Caffe weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)

PREPROCESSING_CHOICES = ("torchvision", "caffe")


def _check_preprocessing(preprocessing, owner: str) -> str:
    if preprocessing not in PREPROCESSING_CHOICES:
        raise ValueError(f"{owner}: preprocessing must be one of {PREPROCESSING_CHOICES}, got {preprocessing!r}")
    return preprocessing


def _check_pair(image, target, owner: str) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        got = (f"{image.dim()}-D {image.dtype} with shape {tuple(image.shape)}"
               if isinstance(image, torch.Tensor) else type(image).__name__)
        raise ValueError(f"{owner}: image must be a uint8 Tensor[3, H, W] (RGB), got {got}")
    if target is None:
        return
    if not isinstance(target, torch.Tensor) or target.dim() != 2 or target.is_floating_point() \
            or target.dtype == torch.bool:
        got = (f"{target.dim()}-D {target.dtype} with shape {tuple(target.shape)}"
               if isinstance(target, torch.Tensor) else type(target).__name__)
        raise ValueError(f"{owner}: target must be an integer Tensor[H, W], got {got}")
    if tuple(target.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"{owner}: target is {tuple(target.shape)}, image {tuple(image.shape[-2:])}")


def normalize(image: torch.Tensor, preprocessing: str = "torchvision") -> torch.Tensor:
    """uint8 Tensor[..., 3, H, W] RGB -> float32 Tensor[..., 3, H, W]: ``"torchvision"``: (x / 255 - ImageNet
    mean) / ImageNet std, RGB; ``"caffe"``: BGR x (0-255) minus the Caffe BGR mean. The mean colour maps to 0 in
    both. ValueError for another preprocessing or a non-uint8 image."""
    _check_preprocessing(preprocessing, "normalize")
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() < 3 \
            or image.shape[-3] != 3:
        raise ValueError("normalize: image must be a uint8 Tensor[..., 3, H, W]")
    x = image.float()
    if preprocessing == "torchvision":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x / 255.0 - mean) / std
    return x.flip(-3) - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32, device=x.device).view(3, 1, 1)


def denormalize(x: torch.Tensor, preprocessing: str) -> torch.Tensor:
    """The inverse of :func:`normalize`: float Tensor[..., 3, H, W] normalised with ``preprocessing``
    ("torchvision": RGB, ImageNet mean / std; "caffe": BGR minus the Caffe mean, 0-255) -> uint8
    Tensor[..., 3, H, W] RGB, rounded to the nearest level and clamped to [0, 255]. ``denormalize(normalize(img, p),
    p)`` is ``img`` exactly; a training crop's rescaled pixels become the nearest levels of their interpolated
    colour, its padding (0, the mean colour) the mean colour. ValueError for another preprocessing or a
    non-floating input."""
    _check_preprocessing(preprocessing, "denormalize")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3 or x.shape[-3] != 3:
        got = f"{x.dtype} with shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"denormalize: x must be a floating-point Tensor[..., 3, H, W], got {got}")
    x = x.detach().float()
    if preprocessing == "torchvision":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
        rgb = (x * std + mean) * 255.0
    else:
        rgb = (x + torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32, device=x.device).view(3, 1, 1)).flip(-3)
    return rgb.round().clamp(0, 255).to(torch.uint8)


def _pair(v, name: str, owner: str) -> Tuple[int, int]:
    vals = (v, v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
    if not isinstance(vals, (tuple, list)) or len(vals) != 2 or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in vals):
        raise ValueError(f"{owner}: {name} must be a positive int or (height, width), got {v!r}")
    return int(vals[0]), int(vals[1])


class TrainTransform:
    """The DeepLab training augmentation: ``(image, target) -> (image, target)``.

    ``TrainTransform(crop_size=321, scale_range=(0.5, 1.5), flip=True, preprocessing="torchvision",
    ignore_index=255, generator=None)``. Input: uint8 Tensor[3, H, W] RGB and an integer Tensor[H, W]; output: float32
    Tensor[3, ch, cw] normalised (``normalize(image, preprocessing)``) and int64 Tensor[ch, cw], with
    ``crop_size`` = ch = cw (an int) or (ch, cw). In order:

    1. normalise the image;
    2. scale both by s ~ U(scale_range) to (round(H s), round(W s)) (at least 1): bilinear
       (``align_corners=False``, no antialias, as cv2's linear resize) for the image, nearest for the target;
       ``scale_range=None`` or (1, 1) skips it;
    3. pad bottom and right up to the crop size: the image with 0 (the mean colour), the target with
       ``ignore_index``;
    4. crop a random ch x cw window (uniform offsets);
    5. with ``flip``, mirror both horizontally with probability 1/2.

    Draws (in that order: s, the crop offsets, the flip) come from the call's ``generator``, else the transform's
    ``generator`` (a ``torch.Generator`` or an int seed), else torch's global generator. ValueError for bad
    arguments or inputs.
    """

    def __init__(self, crop_size: Union[int, Tuple[int, int]] = 321,
                 scale_range: Optional[Tuple[float, float]] = (0.5, 1.5), flip: bool = True,
                 preprocessing: str = "torchvision", ignore_index: int = 255,
                 generator: Optional[Union[torch.Generator, int]] = None):
        owner = "TrainTransform"
        self.crop_size = _pair(crop_size, "crop_size", owner)
        if scale_range is not None:
            if not isinstance(scale_range, (tuple, list)) or len(scale_range) != 2 or any(
                    isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0 for s in scale_range) \
                    or scale_range[0] > scale_range[1]:
                raise ValueError(f"{owner}: scale_range must be (low, high) with 0 < low <= high, or None, got "
                                 f"{scale_range!r}")
            scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_range = scale_range
        self.flip = bool(flip)
        self.preprocessing = _check_preprocessing(preprocessing, owner)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ValueError(f"{owner}: ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)
        if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(int(generator))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"{owner}: generator must be a torch.Generator, an int seed or None, got {generator!r}")
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``generator``: draw from it in this call instead of the transform's own (the training engine gives
        each sample a generator of its own: ``deeplab_fast.train.sampling``)."""
        _check_pair(image, target, "TrainTransform")
        g = self.generator if generator is None else generator
        if target is None:
            raise ValueError("TrainTransform: target must be given")
        x = normalize(image, self.preprocessing)
        y = target.long()
        H, W = x.shape[-2:]
        if self.scale_range is not None and self.scale_range != (1.0, 1.0):
            lo, hi = self.scale_range
            s = lo + (hi - lo) * float(torch.rand((), generator=g))
            size = (max(1, round(H * s)), max(1, round(W * s)))
            if size != (H, W):
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
                y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
            H, W = size
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - H, 0), max(cw - W, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
            H, W = H + pad_h, W + pad_w
        top, left = (int(torch.randint(n, (), generator=g)) if n > 1 else 0 for n in (H - ch + 1, W - cw + 1))
        x = x[:, top:top + ch, left:left + cw]
        y = y[top:top + ch, left:left + cw]
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, flip={self.flip}, "
                f"preprocessing={self.preprocessing!r}, ignore_index={self.ignore_index})")


class EvalTransform:
    """Evaluation: the full image normalised (``normalize(image, preprocessing)``), the target as int64 (None
    passes through). ``EvalTransform(preprocessing="torchvision")``; ``(image, target) -> (float32 Tensor[3, H, W],
    int64 Tensor[H, W])``."""

    def __init__(self, preprocessing: str = "torchvision"):
        self.preprocessing = _check_preprocessing(preprocessing, "EvalTransform")

    def __call__(self, image: torch.Tensor, target: Optional[torch.Tensor] = None):
        _check_pair(image, target, "EvalTransform")
        return normalize(image, self.preprocessing), (None if target is None else target.long())

    def __repr__(self) -> str:
        return f"EvalTransform(preprocessing={self.preprocessing!r})"
