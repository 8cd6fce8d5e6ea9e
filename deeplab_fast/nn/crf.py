"""``DenseCRF``: the fully connected CRF as a post-processing layer for segmentation logits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dense_crf import dense_crf

__all__ = ["DenseCRF", "CRFPreset", "PRESETS"]


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


class DenseCRF(nn.Module):
    """Fully connected CRF refinement of segmentation logits (Krähenbühl & Koltun, NIPS 2011), as used by
    DeepLab v1/v2 (Chen et al., ICLR 2015, sec. 4; TPAMI 2017, sec. 3.3).

    The unary is ``-log_softmax(logits)``; logits smaller than the image (e.g. DeepLab's 1/8-resolution output)
    are first upsampled bilinearly (``align_corners=False``) to the image size. Mean-field inference runs on
    the permutohedral lattice through :func:`deeplab_fast.ops.dense_crf`, on the logits' device.

    Args:
        iterations (int): mean-field steps (default 10).
        gaussian_sxy (float): smoothness kernel standard deviation, pixels (default 3).
        gaussian_compat (float): its Potts weight (default 3).
        bilateral_sxy (float): appearance kernel spatial standard deviation, pixels (default 80).
        bilateral_srgb (float): its colour standard deviation, 8-bit levels (default 13).
        bilateral_compat (float): its Potts weight (default 10).

    Defaults are pydensecrf's; ``DenseCRF.from_preset("deeplab_v2_voc")`` gives DeepLab-v2's VOC kernels.

    Shape:
        - logits (Tensor[B, L, h, w], floating point), with h <= H and w <= W;
        - image (Tensor[B, 3, H, W], uint8 RGB) on the same device;
        - output (Tensor[B, L, H, W], float32): the CRF marginals (probabilities summing to 1 over L).

    Raises:
        ValueError: non-tensor inputs, non-floating logits, logits larger than the image, or a non-4-D input.
        RuntimeError: the errors of :func:`deeplab_fast.ops.dense_crf` (dtype, batch size, channels, NaN...).

    The layer has no parameters and is not differentiable (it is post-processing).
    """

    def __init__(self, iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
                 bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0):
        super().__init__()
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_compat = gaussian_compat
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_compat = bilateral_compat

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DenseCRF":
        """A ``DenseCRF`` with the named kernel settings (see ``PRESETS``), optionally overriding some."""
        if name not in PRESETS:
            raise ValueError(f"unknown DenseCRF preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = {k: v for k, v in asdict(PRESETS[name]).items() if k != "source"}
        kwargs.update(overrides)
        return cls(**kwargs)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, gaussian_sxy={self.gaussian_sxy}, "
                f"gaussian_compat={self.gaussian_compat}, bilateral_sxy={self.bilateral_sxy}, "
                f"bilateral_srgb={self.bilateral_srgb}, bilateral_compat={self.bilateral_compat}")

    def unary(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The unary energies ``-log_softmax`` of the logits at image resolution, Tensor[B, L, H, W] float32."""
        if not isinstance(logits, torch.Tensor) or not isinstance(image, torch.Tensor):
            raise ValueError("DenseCRF expects tensors: logits [B, L, h, w] and image [B, 3, H, W] uint8, got "
                             f"{type(logits).__name__} and {type(image).__name__}")
        if logits.dim() != 4 or image.dim() != 4:
            raise ValueError(f"DenseCRF expects 4-D logits [B, L, h, w] and image [B, 3, H, W], got shapes "
                             f"{tuple(logits.shape)} and {tuple(image.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        (h, w), (H, W) = logits.shape[-2:], image.shape[-2:]
        if h > H or w > W:
            raise ValueError(f"logits ({h}x{w}) are larger than the image ({H}x{W}); resize them first")
        logits = logits.float()
        if (h, w) != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return -F.log_softmax(logits, dim=1)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return dense_crf(self.unary(logits, image), image, iterations=self.iterations,
                             gaussian_sxy=self.gaussian_sxy, gaussian_compat=self.gaussian_compat,
                             bilateral_sxy=self.bilateral_sxy, bilateral_srgb=self.bilateral_srgb,
                             bilateral_compat=self.bilateral_compat)
