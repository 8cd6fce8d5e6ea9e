"""``DenseCRF3d``: the volumetric dense CRF as a layer for 3-D segmentation logits, with MONAI's call convention
``forward(logits, reference)``; trainable compatibilities (CRF-as-RNN); and a MONAI mode that reproduces
``monai.networks.blocks.CRF``'s model."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import is_real, per_axis, positive_float
from ..ops.dense_crf import NORMALIZE_AFTER, NORMALIZE_SYMMETRIC, _require_int, dense_crf_pairwise_energy
from ..ops.dense_crf_3d import DEFAULTS_3D, _check_volume_args, _volume_features, dense_crf_3d
from .crf import TRAINABLE_TERMS, _check_compat_form, _check_layer_inputs, _compat_parameter, _trained_terms

__all__ = ["DenseCRF3d", "MONAI_DEFAULTS"]

_BANDWIDTHS_3D = ("gaussian_sigma", "bilateral_sigma", "intensity_sigma", "spacing")

# monai.networks.blocks.CRF's arguments and defaults (MONAI 1.x, monai/networks/blocks/crf.py), in its order.
MONAI_DEFAULTS = dict(iterations=5, bilateral_weight=1.0, gaussian_weight=1.0, bilateral_spatial_sigma=5.0,
                      bilateral_color_sigma=0.5, gaussian_spatial_sigma=5.0, update_factor=3.0,
                      compatibility_matrix=None)

Sigma = Union[float, Sequence[float]]


class DenseCRF3d(nn.Module):
    """Fully connected CRF refinement of volumetric segmentation logits (Kamnitsas et al., MedIA 2017, the 3-D
    dense CRF of DeepMedic), on :func:`deeplab_fast.ops.dense_crf_3d`; with ``trainable=True``, a CRF-as-RNN head
    (Zheng et al., ICCV 2015) whose compatibilities are learned end to end.

    The unary is ``-log_softmax(logits)``. Mean-field inference runs on the permutohedral lattice, on the logits'
    device, in float32 (autocast is turned off inside the layer).

    Args:
        iterations (int): mean-field steps (default 5).
        gaussian_sigma (float | 3 floats): smoothness kernel standard deviation along D, H, W, mm (default 3).
        gaussian_compat (float): its Potts weight (default 3).
        bilateral_sigma (float | 3 floats): appearance kernel spatial standard deviation, mm (default 5).
        intensity_sigma (float | C floats): its intensity standard deviation per channel, in the reference's units
            (default 3: 8-bit levels).
        bilateral_compat (float): its Potts weight (default 5).
        spacing (float | 3 floats): the voxel size along D, H, W in mm (keyword; default 1); ``forward`` may
            override it per call.
        normalization (int): the kernels' normalisation (keyword; default ``NORMALIZE_SYMMETRIC``).
        trainable (bool | str | sequence of str): learn the compatibilities (keyword; default False), as
            :class:`DenseCRF`: ``True`` or term names ``"gaussian_compat"``, ``"bilateral_compat"``. The standard
            deviations and the spacing cannot be learned (``NotImplementedError``).
        compat (str): the learned compatibilities' form, ``"potts"`` or ``"matrix"`` (``[L, L]``, initialised to
            ``-w * I``); see :class:`DenseCRF`.
        num_classes (int): L, needed for ``compat="matrix"``.
        checkpoint (bool): in training, recompute the iterations in the backward instead of keeping them.

    Defaults are dense3dCrf's (see :func:`deeplab_fast.ops.dense_crf_3d`).

    MONAI mode: ``DenseCRF3d.monai(iterations, bilateral_weight, gaussian_weight, bilateral_spatial_sigma,
    bilateral_color_sigma, gaussian_spatial_sigma, update_factor, compatibility_matrix)`` takes
    ``monai.networks.blocks.CRF``'s arguments, names, order and defaults and computes its model::

        Q_0 = softmax(logits)
        Q_t+1 = softmax(logits + update_factor * ((bilateral_weight * B(Q_t) + gaussian_weight * G(Q_t)) @ M))

    where ``B`` and ``G`` are Gaussian filters normalised after filtering (``K q / K 1``) on the features
    (positions in voxels along D, H, W) / bilateral_spatial_sigma then reference / bilateral_color_sigma, and
    positions / gaussian_spatial_sigma; ``M`` is the compatibility matrix (none: the identity). It is the dense
    CRF with ``NORMALIZE_AFTER``, unary ``-logits`` and Potts weights ``update_factor * weight`` (or the matrices
    ``-update_factor * weight * M^T``), so it runs on the same op. A non-symmetric ``M`` cannot be expressed in the
    op's symmetric compatibilities: that case runs MONAI's loop itself on the op's lattice filter, without a
    gradient. Unlike MONAI's (whose filter has no backward), the mode with a symmetric or no ``M`` has the op's
    exact gradient with respect to the logits; and the sigmas may be given per axis, the spacing set (both
    defaults reproduce MONAI).

    Shape:
        - logits (Tensor[B, L, D, H, W], floating point);
        - reference (Tensor[B, C, D, H, W], float or uint8, C from 1 to 13): the image the CRF follows, on the
          same device;
        - output (Tensor[B, L, D, H, W], float32): the marginals (summing to 1 over L), as MONAI's CRF returns.

    Raises:
        ValueError: non-tensor or wrongly shaped inputs, logits and reference of other sizes, bad constructor
            arguments (as :func:`deeplab_fast.ops.dense_crf_3d` names them; MONAI mode: MONAI's names).
        NotImplementedError: ``trainable`` naming a bandwidth; a gradient through the non-symmetric MONAI case.
        MemoryError: the volume does not fit (see :func:`deeplab_fast.ops.dense_crf_3d_memory`).

    Without trainable compatibilities the layer is post-processing and runs under ``no_grad`` (as
    :class:`DenseCRF`); call :func:`deeplab_fast.ops.dense_crf_3d` for gradients into the logits through fixed
    compatibilities. A trainable layer works under ``torch.compile(fullgraph=True)`` and its ``state_dict`` holds
    the learned compatibilities.
    """

    def __init__(self, iterations: int = DEFAULTS_3D["iterations"],
                 gaussian_sigma: Sigma = DEFAULTS_3D["gaussian_sigma"],
                 gaussian_compat: float = DEFAULTS_3D["gaussian_compat"],
                 bilateral_sigma: Sigma = DEFAULTS_3D["bilateral_sigma"],
                 intensity_sigma: Sigma = DEFAULTS_3D["intensity_sigma"],
                 bilateral_compat: float = DEFAULTS_3D["bilateral_compat"], *, spacing: Sigma = 1.0,
                 normalization: int = NORMALIZE_SYMMETRIC, trainable=False, compat: str = "potts",
                 num_classes: Optional[int] = None, checkpoint: bool = False):
        super().__init__()
        owner = "DenseCRF3d"
        trained = _trained_terms(trainable, owner, TRAINABLE_TERMS, _BANDWIDTHS_3D)
        _check_compat_form(compat, trained, num_classes, owner)
        self.mode = "deeplab_fast"
        self.iterations = _require_int(iterations, "iterations")
        self.gaussian_sigma = per_axis(gaussian_sigma, 3, "gaussian_sigma", owner)
        self.bilateral_sigma = per_axis(bilateral_sigma, 3, "bilateral_sigma", owner)
        # one value for every channel, or one per channel (checked against the reference's channels per call)
        self.intensity_sigma = (positive_float(intensity_sigma, "intensity_sigma", owner) if is_real(intensity_sigma)
                                else per_axis(intensity_sigma, _length(intensity_sigma, "intensity_sigma", owner),
                                              "intensity_sigma", owner, "channel"))
        self.spacing = per_axis(spacing, 3, "spacing", owner)
        self.normalization = _require_int(normalization, "normalization", 0, 3)
        self.trained = trained
        self.compat = compat
        self.num_classes = num_classes
        self.checkpoint = bool(checkpoint)
        self._init_compat = dict(gaussian_compat=gaussian_compat, bilateral_compat=bilateral_compat)
        for name, value in self._init_compat.items():
            setattr(self, name, _compat_parameter(value, name, compat, num_classes, owner) if name in trained
                    else value)

    @classmethod
    def monai(cls, iterations: int = 5, bilateral_weight: float = 1.0, gaussian_weight: float = 1.0,
              bilateral_spatial_sigma: Sigma = 5.0, bilateral_color_sigma: Sigma = 0.5,
              gaussian_spatial_sigma: Sigma = 5.0, update_factor: float = 3.0,
              compatibility_matrix: Optional[torch.Tensor] = None) -> "DenseCRF3d":
        """A layer computing ``monai.networks.blocks.CRF(...)``'s model (same arguments, order and defaults); see
        the class docstring. ``DenseCRF3d.monai(**kwargs)(logits, reference)`` replaces
        ``CRF(**kwargs)(logits, reference)``."""
        owner = "DenseCRF3d.monai"
        for name, value in (("bilateral_weight", bilateral_weight), ("gaussian_weight", gaussian_weight),
                            ("update_factor", update_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(float(value)) < float("inf"):
                raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        if compatibility_matrix is not None:
            if not isinstance(compatibility_matrix, torch.Tensor) or compatibility_matrix.dim() != 2 or \
                    compatibility_matrix.shape[0] != compatibility_matrix.shape[1] or \
                    not compatibility_matrix.is_floating_point():
                raise ValueError(f"{owner}: compatibility_matrix must be a float tensor [L, L] (or None), got "
                                 f"{getattr(compatibility_matrix, 'shape', type(compatibility_matrix).__name__)}")
            if not bool(torch.isfinite(compatibility_matrix).all()):
                raise ValueError(f"{owner}: compatibility_matrix must be finite")
        for name, value in (("bilateral_spatial_sigma", bilateral_spatial_sigma),
                            ("gaussian_spatial_sigma", gaussian_spatial_sigma)):
            per_axis(value, 3, name, owner)
        if is_real(bilateral_color_sigma):
            positive_float(bilateral_color_sigma, "bilateral_color_sigma", owner)
        else:
            per_axis(bilateral_color_sigma, _length(bilateral_color_sigma, "bilateral_color_sigma", owner),
                     "bilateral_color_sigma", owner, "channel")
        # the native attributes mirror MONAI's (the forward reads MONAI's, see _model)
        layer = cls(iterations=iterations, gaussian_sigma=gaussian_spatial_sigma,
                    gaussian_compat=float(update_factor) * float(gaussian_weight),
                    bilateral_sigma=bilateral_spatial_sigma, intensity_sigma=bilateral_color_sigma,
                    bilateral_compat=float(update_factor) * float(bilateral_weight), normalization=NORMALIZE_AFTER)
        layer.mode = "monai"
        # MONAI's attribute names (plain attributes, as MONAI keeps them; the matrix moves with the logits)
        layer.bilateral_weight, layer.gaussian_weight = float(bilateral_weight), float(gaussian_weight)
        layer.bilateral_spatial_sigma, layer.bilateral_color_sigma = bilateral_spatial_sigma, bilateral_color_sigma
        layer.gaussian_spatial_sigma, layer.update_factor = gaussian_spatial_sigma, float(update_factor)
        layer.compatibility_matrix = compatibility_matrix
        return layer

    @property
    def trainable(self) -> bool:
        return bool(self.trained)

    def extra_repr(self) -> str:
        if self.mode == "monai":
            m = self.compatibility_matrix
            return (f"mode='monai', iterations={self.iterations}, bilateral_weight={self.bilateral_weight}, "
                    f"gaussian_weight={self.gaussian_weight}, bilateral_spatial_sigma={self.bilateral_spatial_sigma}, "
                    f"bilateral_color_sigma={self.bilateral_color_sigma}, "
                    f"gaussian_spatial_sigma={self.gaussian_spatial_sigma}, update_factor={self.update_factor}, "
                    f"compatibility_matrix={None if m is None else f'matrix{list(m.shape)}'}")
        parts = [f"iterations={self.iterations}", f"gaussian_sigma={self.gaussian_sigma}",
                 f"gaussian_compat={_compat_repr(self.gaussian_compat)}", f"bilateral_sigma={self.bilateral_sigma}",
                 f"intensity_sigma={self.intensity_sigma}", f"bilateral_compat={_compat_repr(self.bilateral_compat)}",
                 f"spacing={self.spacing}"]
        if self.normalization != NORMALIZE_SYMMETRIC:
            parts.append(f"normalization={self.normalization}")
        if self.trained:
            parts.append(f"compat={self.compat!r}")
        if self.checkpoint:
            parts.append("checkpoint=True")
        return ", ".join(parts)

    def _check_inputs(self, logits, reference) -> None:
        _check_layer_inputs("DenseCRF3d", logits, reference, "reference", "[B, L, D, H, W]", "[B, C, D, H, W]")
        if logits.shape[0] != reference.shape[0] or logits.shape[2:] != reference.shape[2:]:
            raise ValueError(f"DenseCRF3d: logits {tuple(logits.shape)} and reference {tuple(reference.shape)} must "
                             "have the same batch size and volume shape")
        if self.compat == "matrix" and self.trained and logits.shape[1] != self.num_classes:
            raise ValueError(f"DenseCRF3d: the logits have {logits.shape[1]} classes, the layer's compatibility "
                             f"matrices {self.num_classes}")

    def _model(self, num_labels: int, device) -> dict:
        """The op's standard deviations and compatibilities for this layer; in MONAI mode read from MONAI's
        attributes at every call (so that changing, e.g., ``crf.update_factor`` works as in MONAI)."""
        if self.mode != "monai":
            return dict(gaussian_sigma=self.gaussian_sigma, bilateral_sigma=self.bilateral_sigma,
                        intensity_sigma=self.intensity_sigma, gaussian_compat=self.gaussian_compat,
                        bilateral_compat=self.bilateral_compat)
        uf, gw, bw = float(self.update_factor), float(self.gaussian_weight), float(self.bilateral_weight)
        model = dict(gaussian_sigma=self.gaussian_spatial_sigma, bilateral_sigma=self.bilateral_spatial_sigma,
                     intensity_sigma=self.bilateral_color_sigma, gaussian_compat=uf * gw, bilateral_compat=uf * bw)
        if self.compatibility_matrix is not None:
            m = self.compatibility_matrix.to(device=device, dtype=torch.float32)
            if m.shape[0] != num_labels:
                raise ValueError(f"DenseCRF3d.monai: compatibility_matrix is {tuple(m.shape)} but the logits have "
                                 f"{num_labels} classes")
            model.update(gaussian_compat=-uf * gw * m.t(), bilateral_compat=-uf * bw * m.t(), matrix=m)
        return model

    def _infer(self, logits: torch.Tensor, reference: torch.Tensor, spacing) -> torch.Tensor:
        logits = logits.float()
        spacing = self.spacing if spacing is None else spacing
        model = self._model(logits.shape[1], logits.device)
        if self.mode == "monai":
            unary = -logits  # MONAI's softmax(logits + ...): the unary energies are -logits
            m = model.pop("matrix", None)
            if m is not None and not torch.equal(m, m.t()):
                return self._monai_loop(logits, reference, spacing, m, model)
        else:
            unary = -F.log_softmax(logits, dim=1)
        return dense_crf_3d(unary, reference, spacing=spacing, iterations=self.iterations,
                            normalization=self.normalization, checkpoint=self.checkpoint, **model)

    def _monai_loop(self, logits: torch.Tensor, reference: torch.Tensor, spacing, m: torch.Tensor,
                    model: dict) -> torch.Tensor:
        """MONAI's mean-field loop for a non-symmetric compatibility matrix ``m``, each iteration's filtering on the
        op's lattice (dense_crf_pairwise_energy with Potts weights -w gives w * K q / K 1)."""
        if torch.is_grad_enabled() and logits.requires_grad:
            raise NotImplementedError("DenseCRF3d.monai: a non-symmetric compatibility_matrix has no gradient (the "
                                      "op's compatibilities are symmetric); use a symmetric one, or run under "
                                      "torch.no_grad()")
        b, l = logits.shape[:2]
        args = _check_volume_args(-logits, reference, spacing, model["gaussian_sigma"], model["bilateral_sigma"],
                                  model["intensity_sigma"], NORMALIZE_AFTER)
        gaussian, bilateral = _volume_features(reference, *args[:4])
        weights = [-float(self.bilateral_weight), -float(self.gaussian_weight)]
        flat = logits.reshape(b, l, -1)
        q = torch.softmax(flat, dim=1)
        for _ in range(self.iterations):
            combined = dense_crf_pairwise_energy(q, [bilateral, gaussian], weights, [NORMALIZE_AFTER] * 2)
            combined = torch.matmul(combined.transpose(1, 2), m).transpose(1, 2)
            q = torch.softmax(flat + float(self.update_factor) * combined, dim=1)
        return q.reshape(logits.shape)

    def forward(self, logits: torch.Tensor, reference: torch.Tensor, spacing: Sigma | None = None) -> torch.Tensor:
        """Refines ``logits`` [B, L, D, H, W] guided by ``reference`` [B, C, D, H, W]; ``spacing`` (mm along D, H, W)
        overrides the layer's for this call. Returns the marginals [B, L, D, H, W] float32."""
        self._check_inputs(logits, reference)
        if not self.trained:
            with torch.no_grad():
                return self._infer(logits, reference, spacing)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._infer(logits, reference, spacing)


def _compat_repr(value) -> str:
    if not isinstance(value, torch.Tensor):
        return f"{value}"
    if value.dim() == 0:
        return f"{float(value.detach()):.6g} (learned)"
    return f"matrix{list(value.shape)} (learned)"


def _length(value, name: str, owner: str) -> int:
    try:
        return len(value)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be a number or a sequence of numbers (one per channel), got "
                         f"{type(value).__name__}") from None
