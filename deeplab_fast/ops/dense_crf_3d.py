"""The volumetric dense CRF: mean-field inference over the voxels of 3-D (medical) volumes.

The model is the fully connected CRF of Krähenbühl & Koltun (NIPS 2011) extended to volumes as in Kamnitsas et
al., "Efficient multi-scale 3D CNN with fully connected CRF for accurate brain lesion segmentation", Medical
Image Analysis 36, 2017 (section 2.4; their dense3dCrf code, also the 3-D part of SimpleCRF): a Gaussian
smoothness term on voxel positions and a bilateral appearance term on positions and the intensities of every
channel (modality). Here positions are physical (index x voxel spacing, in mm), so the standard deviations are
in mm and anisotropic voxels are handled; each can be given per axis.

It is exactly the generic dense CRF (:func:`deeplab_fast.ops.dense_crf_features`, pydensecrf's ``DenseCRF``)
with these features, in this order:

- Gaussian term: the positions along D, H, W: ``index * spacing / gaussian_sigma``;
- bilateral term: the positions along D, H, W (``index * spacing / bilateral_sigma``), then each channel's
  ``intensity / intensity_sigma``.

Feature values are float32, evaluated as follows (so that a later op generating them in C++ or CUDA gives the
same bits): the spacing and the standard deviations are first rounded to float32; a position is
``float32(i * spacing / sigma)`` computed in float64 (one rounding to float32 at the end); an intensity is the
float32 quotient ``float32(intensity) / sigma``. With spacing 1 this is the float division ``i / sigma`` of
Krähenbühl's ``DenseCRF2D`` and of dense3dCrf's ``DenseCRF3D``, bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from .. import _env
from .._validation import is_int, per_axis
from .dense_crf import (NO_NORMALIZATION, NORMALIZE_SYMMETRIC, Compat, _as_compat, _require_int, _require_tensor,
                        dense_crf_features, label_stride)

__all__ = ["dense_crf_3d", "dense_crf_3d_memory", "DEFAULTS_3D", "MAX_CHANNELS"]

# The most image channels (modalities): 3 positions + 13 intensities fill the lattice's 16 feature dimensions.
MAX_CHANNELS = 13

# The largest |feature| accepted: the lattice's elevated coordinates grow by at most 2.4x for d <= 16 and must
# stay below 2^22 (the same bound as the image op's standard-deviation check).
_MAX_FEATURE = 2.0**19

# Defaults: dense3dCrf (Kamnitsas et al. 2017; deepmedic/dense3dCrf, applicationAndExamples/
# dense3DCrfInferenceOnNiis.cpp, its CRF parameters' defaults), for volumes of 1 mm isotropic voxels (its
# standard deviations are in voxels) and 8-bit intensities (it maps each modality's normalised range to 0..255).
DEFAULTS_3D = dict(
    iterations=5,            # MaxIterations 5
    gaussian_sigma=3.0,      # PosRStd = PosCStd = PosZStd = 3
    gaussian_compat=3.0,     # PosW 3
    bilateral_sigma=5.0,     # BilateralRStd = BilateralCStd = BilateralZStd = 5
    intensity_sigma=3.0,     # BilateralModsStds 3 per modality (8-bit levels)
    bilateral_compat=5.0,    # BilateralW 5
)

Sigma = Union[float, Sequence[float]]

_FLOAT_TYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Argument checks, once for the op, the layer, the SimpleCRF drop-in and the command line.


def _f32(value: float) -> float:
    """``value`` rounded to float32 (kept as a Python float)."""
    return float(np.float32(value))


def _check_float32(values: tuple, name: str) -> tuple:
    """The values rounded to float32; ValueError naming ``name`` when one leaves float32's normal range."""
    out = tuple(_f32(v) for v in values)
    for v, r in zip(values, out):
        if not (math.isfinite(r) and r >= float(np.finfo(np.float32).tiny)):
            raise ValueError(f"dense_crf_3d: {name} must be representable in float32 (between 1.2e-38 and 3.4e38), "
                             f"got {v!r}")
    return out


def _check_volume_args(unary: torch.Tensor, image: torch.Tensor, spacing, gaussian_sigma, bilateral_sigma,
                       intensity_sigma, normalization):
    """Checks what ``dense_crf_3d`` takes besides the compatibilities; returns (spacing, gaussian_sigma,
    bilateral_sigma, intensity_sigma, normalization) as float32-rounded tuples and an int."""
    _require_tensor(unary, "unary")
    _require_tensor(image, "image")
    if unary.dim() != 5:
        raise ValueError(f"dense_crf_3d: unary must be 5-D [B, L, D, H, W], got shape {tuple(unary.shape)}")
    if unary.dtype not in _FLOAT_TYPES or (unary.dtype == torch.float64 and unary.device.type == "cuda"):
        raise ValueError(f"dense_crf_3d: unary must be float32 (or float64 on the CPU), got {unary.dtype}")
    b, l, d, h, w = unary.shape
    if b < 1 or l < 1 or min(d, h, w) < 1:
        raise ValueError(f"dense_crf_3d: unary must have a batch, at least one label and one voxel, got shape "
                         f"{tuple(unary.shape)}")
    if image.dim() != 5:
        raise ValueError(f"dense_crf_3d: image must be 5-D [B, C, D, H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(f"dense_crf_3d: image must hold real intensities (uint8, float32, ...), got {image.dtype}")
    if image.shape[0] != b or tuple(image.shape[2:]) != (d, h, w):
        raise ValueError(f"dense_crf_3d: image must have the unary's batch size and volume shape [B, C, D, H, W] = "
                         f"[{b}, C, {d}, {h}, {w}], got {tuple(image.shape)}")
    c = image.shape[1]
    if not 1 <= c <= MAX_CHANNELS:
        raise ValueError(f"dense_crf_3d: image must have 1 to {MAX_CHANNELS} channels (modalities), got {c}")
    if image.device != unary.device:
        raise ValueError(f"dense_crf_3d: image is on {image.device} but the unary is on {unary.device}")
    spacing = _check_float32(per_axis(spacing, 3, "spacing", "dense_crf_3d"), "spacing")
    gaussian_sigma = _check_float32(per_axis(gaussian_sigma, 3, "gaussian_sigma", "dense_crf_3d"), "gaussian_sigma")
    bilateral_sigma = _check_float32(per_axis(bilateral_sigma, 3, "bilateral_sigma", "dense_crf_3d"),
                                     "bilateral_sigma")
    intensity_sigma = _check_float32(per_axis(intensity_sigma, c, "intensity_sigma", "dense_crf_3d", "channel"),
                                     "intensity_sigma")
    normalization = _require_int(normalization, "normalization", NO_NORMALIZATION, NORMALIZE_SYMMETRIC)
    for name, sigmas in (("gaussian_sigma", gaussian_sigma), ("bilateral_sigma", bilateral_sigma)):
        for axis, (n, sp, sg) in enumerate(zip((d, h, w), spacing, sigmas)):
            if (n - 1) * sp / sg > _MAX_FEATURE:
                raise ValueError(
                    f"dense_crf_3d: {name} along axis {'DHW'[axis]} is too small for this volume: its positions "
                    f"(index * spacing / sigma) reach {(n - 1) * sp / sg:.3g}, beyond the lattice's range "
                    f"(2^19); use at least {(n - 1) * sp / _MAX_FEATURE:.3g} mm")
    return spacing, gaussian_sigma, bilateral_sigma, intensity_sigma, normalization


def _check_compat(compat: Compat, name: str, labels: int, device: torch.device) -> torch.Tensor:
    """A compatibility as the op takes it (see ``dense_crf``), its shape checked against L and its device against
    the unary's, so that errors name ``name``."""
    c = _as_compat(compat, name)
    if c.dim() != 0 and tuple(c.shape) not in ((labels,), (labels, labels)):
        raise ValueError(f"dense_crf_3d: {name} must be a number (Potts weight), a vector [L] or a matrix [L, L] with "
                         f"L = {labels}, got shape {tuple(c.shape)}")
    if c.device.type not in ("cpu", device.type) or (c.device.type == device.type and c.device != device):
        raise ValueError(f"dense_crf_3d: {name} is on {c.device}; it must be on the CPU or on the unary's device "
                         f"({device})")
    if not torch.compiler.is_compiling() and c.device.type != "meta" and not bool(torch.isfinite(c.detach()).all()):
        raise ValueError(f"dense_crf_3d: {name} must be finite")
    return c


def _check_intensities(image: torch.Tensor, intensity_sigma: tuple) -> None:
    """The intensities must be finite and, divided by their standard deviations, fit the lattice. One pass over
    a floating-point image (none for integer ones); skipped while tracing (the op checks the features)."""
    if torch.compiler.is_compiling() or image.device.type == "meta":
        return
    if image.dtype == torch.uint8:
        largest = [255.0] * image.shape[1]
    else:  # two reductions, no temporary copy of the image
        x = image.detach()
        largest = torch.maximum(x.amax(dim=(0, 2, 3, 4)).double(), -x.amin(dim=(0, 2, 3, 4)).double()).cpu().tolist()
    for ch, (m, s) in enumerate(zip(largest, intensity_sigma)):
        if not math.isfinite(m):
            raise ValueError(f"dense_crf_3d: image channel {ch} contains NaN or inf")
        if m / s > _MAX_FEATURE:
            raise ValueError(f"dense_crf_3d: intensity_sigma[{ch}] = {s:g} is too small for image channel {ch} (|values| "
                             f"up to {m:g}): intensity / sigma must stay below 2^19; use at least "
                             f"{m / _MAX_FEATURE:.3g}")


# ---------------------------------------------------------------------------------------------------------
# The features. One function builds both terms' features from the image and the geometry, so that a later op
# can generate them inside the lattice build without changing the public API.


def _axis_positions(n: int, spacing: float, sigma: float, device) -> torch.Tensor:
    """float32(i * spacing / sigma) for i < n, computed in float64 (spacing and sigma already float32 values)."""
    return (torch.arange(n, dtype=torch.float64, device=device) * spacing / sigma).to(torch.float32)


def _volume_features(image: torch.Tensor, spacing: tuple, gaussian_sigma: tuple, bilateral_sigma: tuple,
                     intensity_sigma: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian and bilateral features of volumes: ([B, 3, N], [B, 3 + C, N]) float32, N = D * H * W, in the
    order the module docstring gives. Arguments as checked by ``_check_volume_args``."""
    b, c, d, h, w = image.shape
    dev = image.device
    gaussian = torch.empty((b, 3, d, h, w), dtype=torch.float32, device=dev)
    bilateral = torch.empty((b, 3 + c, d, h, w), dtype=torch.float32, device=dev)
    for axis, n in enumerate((d, h, w)):
        shape = [1, 1, 1]
        shape[axis] = n
        gaussian[:, axis] = _axis_positions(n, spacing[axis], gaussian_sigma[axis], dev).view(shape)
        bilateral[:, axis] = _axis_positions(n, spacing[axis], bilateral_sigma[axis], dev).view(shape)
    bilateral[:, 3:] = image
    sigma = torch.tensor(intensity_sigma, dtype=torch.float32, device=dev).view(1, c, 1, 1, 1)
    bilateral[:, 3:] /= sigma
    return gaussian.view(b, 3, d * h * w), bilateral.view(b, 3 + c, d * h * w)


# ---------------------------------------------------------------------------------------------------------
# Memory.

# The estimate's lattice size (points per voxel, M / N), calibrated by counting the lattice points of synthetic
# MR-like 8-bit volumes (blobs, noise of 10 levels, default standard deviations at 1 mm): the Gaussian term has
# about 1.3 points per cube of side sigma / spacing (0.048 at 3 voxels); the bilateral term about 0.25 with one
# channel and 1.9 with two (its points multiply with every noisy channel), assumed 0.5 * 4^(C - 1). Both are
# capped at d + 1, every voxel in a simplex of its own. Each point holds S values and about 12 (d + 2) bytes of
# bookkeeping (keys, hash table, blur chains; measured).
_GAUSSIAN_POINTS_PER_CELL = 1.3


def dense_crf_3d_memory(shape: Sequence[int], labels: int, channels: int = 1, *, batch: int = 1,
                        spacing: Sigma = 1.0, gaussian_sigma: Sigma = DEFAULTS_3D["gaussian_sigma"],
                        iterations: int = DEFAULTS_3D["iterations"], history: bool = False, device: str = "cpu",
                        threads: int | None = None) -> int:
    """An estimate of the working memory, in bytes, that :func:`dense_crf_3d` allocates beyond its inputs.

    Per voxel (N = D * H * W; S = L on the CPU for L <= 2, 4 for 3 and 4 labels, else L rounded up to 8; on CUDA
    L rounded up to 4):

    - the features, ``4 * (6 + C)`` bytes per volume of the batch (built in Python in this version), and the
      output Q, ``4 * L``;
    - per volume in flight (one at a time, or one per thread when the batch has at least as many volumes as
      threads): the unary and the marginals in the kernels' layout, ``8 * S``; per term, the lattice embedding
      ``8 * (d + 1)`` (d = 3, and 3 + C for the bilateral term) and the normalisation, 8; and the lattice points,
      ``4 * S + 12 * (d + 2)`` bytes each. Their number depends on the data: assumed here 1.3 per cube of side
      ``gaussian_sigma / spacing`` for the Gaussian term (0.05 per voxel at 3 voxels) and ``0.5 * 4^(C - 1)`` per
      voxel for the bilateral one (counted on MR-like 8-bit volumes with noise of about 3 intensity_sigma: 0.25
      with one channel, 1.9 with two), at most d + 1. Noisier images or smaller standard deviations make more;
    - with ``history`` (a gradient is needed and ``checkpoint=False``): the marginals of every iteration,
      ``4 * iterations * S`` per volume.

    Measured peaks (one thread, the synthetic volumes of ``deeplab_fast.data.synthetic_volume``): 64x128x128
    with 3 labels and one channel 199 bytes per voxel (estimate 208; 221 before the CPU's label stride of 3
    labels became 4), 2 labels 182 (estimate 183), 4 labels and 2 channels 338 (estimate 444; with stride 8).
    A 512^3 volume with 3 labels and one channel: about 28 GB.

    Args:
        shape (sequence of 3 ints): the volume's (D, H, W).
        labels (int): L.
        channels (int): C, the image channels (default 1).
        batch (int): B (default 1).
        spacing, gaussian_sigma (float | 3 floats): as :func:`dense_crf_3d` (they set the Gaussian term's size).
        iterations (int): mean-field iterations (they count only with ``history``).
        history (bool): whether the forward keeps every iteration's marginals for a backward.
        device (str): "cpu" or "cuda" (the label stride differs).
        threads (int, optional): the CPU threads (default ``torch.get_num_threads()``).

    Returns:
        int: bytes.

    Raises:
        ValueError: a bad shape, labels, channels, batch, spacing, gaussian_sigma or iterations.
    """
    owner = "dense_crf_3d_memory"
    shape = tuple(shape) if not isinstance(shape, (str, bytes)) and hasattr(shape, "__len__") else None
    if shape is None or len(shape) != 3 or not all(is_int(s) and s >= 1 for s in shape):
        raise ValueError(f"{owner}: shape must be three positive ints (D, H, W), got {shape!r}")
    for name, v, low in (("labels", labels, 1), ("channels", channels, 1), ("batch", batch, 1),
                         ("iterations", iterations, 0)):
        if not is_int(v) or v < low:
            raise ValueError(f"{owner}: {name} must be an int >= {low}, got {v!r}")
    if channels > MAX_CHANNELS:
        raise ValueError(f"{owner}: channels must be at most {MAX_CHANNELS}, got {channels}")
    cells = np.prod([sp / sg for sp, sg in zip(per_axis(spacing, 3, "spacing", owner),
                                                per_axis(gaussian_sigma, 3, "gaussian_sigma", owner))])
    dev = torch.device(device).type
    n = int(np.prod(shape))
    s = label_stride(labels, torch.device(dev))
    if dev == "cpu":
        threads = threads or torch.get_num_threads()
        in_flight = min(batch, threads) if batch >= threads and batch > 1 else 1
    else:
        in_flight = 1
    per_volume = 8 * s  # unary and marginals, [N, S]
    for d, points in ((3, _GAUSSIAN_POINTS_PER_CELL * cells), (3 + channels, 0.5 * 4.0 ** (channels - 1))):
        per_volume += 8 * (d + 1) + 8 + min(d + 1.0, points) * (4 * s + 12 * (d + 2))
    total = n * (batch * 4 * (6 + channels + labels) + in_flight * per_volume)
    if history:
        total += n * batch * 4 * iterations * s
    return int(total)


def _available_bytes(device: torch.device) -> int | None:
    """Memory the process can still allocate on ``device``, or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:  # a cgroup (v2) limit, as in a container
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used) if avail is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return avail


def _check_memory(unary: torch.Tensor, channels: int, spacing: tuple, gaussian_sigma: tuple, iterations: int,
                  history: bool) -> None:
    if torch.compiler.is_compiling() or unary.device.type not in ("cpu", "cuda"):
        return
    if _env.no_memory_check():
        return
    b, l, d, h, w = unary.shape
    need = dense_crf_3d_memory((d, h, w), l, channels, batch=b, spacing=spacing, gaussian_sigma=gaussian_sigma,
                               iterations=iterations, history=history, device=unary.device.type)
    avail = _available_bytes(unary.device)
    if avail is not None and need > avail:
        raise MemoryError(
            f"dense_crf_3d: {b} x {d}x{h}x{w} voxels with {l} labels and {channels} channel(s) need about "
            f"{need / 1e9:.1f} GB of working memory (dense_crf_3d_memory) but {avail / 1e9:.1f} GB are available "
            f"on {unary.device}; crop the volume to the region of interest, run the batch one volume at a time, "
            f"or set DEEPLAB_FAST_NO_MEMORY_CHECK=1 to try anyway")


# ---------------------------------------------------------------------------------------------------------
# The op.


def dense_crf_3d(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    spacing: Sigma = (1.0, 1.0, 1.0),
    gaussian_sigma: Sigma = DEFAULTS_3D["gaussian_sigma"],
    gaussian_compat: Compat = DEFAULTS_3D["gaussian_compat"],
    bilateral_sigma: Sigma = DEFAULTS_3D["bilateral_sigma"],
    intensity_sigma: Sigma = DEFAULTS_3D["intensity_sigma"],
    bilateral_compat: Compat = DEFAULTS_3D["bilateral_compat"],
    iterations: int = DEFAULTS_3D["iterations"],
    normalization: int = NORMALIZE_SYMMETRIC,
    q_init: torch.Tensor | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Dense CRF mean-field inference over volumes (Kamnitsas et al. 2017's 3-D dense CRF, with voxel spacing);
    differentiable.

    Equivalent to pydensecrf's generic ``DenseCRF(N, L)`` per volume with ``setUnaryEnergy(unary)``,
    ``addPairwiseEnergy(gaussian_features, gaussian_compat)``, ``addPairwiseEnergy(bilateral_features,
    bilateral_compat)`` and ``inference(iterations)``, the features being those of the module docstring
    (positions along D, H, W in mm divided by the standard deviations; then, for the bilateral term, each
    channel's intensity divided by its standard deviation).

    Args:
        unary (Tensor[B, L, D, H, W], float32; float64 on the CPU): unary energies (negative log probabilities).
            ``+inf`` marks an impossible label; NaN and ``-inf`` are errors.
        image (Tensor[B, C, D, H, W], float32 or uint8; other real dtypes are converted to float32): the
            intensities of C = 1 to 13 co-registered channels (modalities), on the unary's device.
        spacing (float | (float, float, float)): the voxel size along D, H, W, in mm (default 1; a NIfTI header's
            zooms, in the array's axis order).
        gaussian_sigma (float | 3 floats): spatial standard deviation of the smoothness term along D, H, W, in mm
            (default 3).
        gaussian_compat (float | Tensor[] | Tensor[L] | Tensor[L, L]): its label compatibility: a Potts weight
            (default 3), a diagonal or a matrix (symmetrised), as :func:`dense_crf`. May require grad.
        bilateral_sigma (float | 3 floats): spatial standard deviation of the appearance term, mm (default 5).
        intensity_sigma (float | C floats): its intensity standard deviation, per channel, in the image's units
            (default 3: 8-bit levels).
        bilateral_compat (float | Tensor[] | Tensor[L] | Tensor[L, L]): its label compatibility (default Potts 5).
        iterations (int): mean-field steps, in [0, 2^31 - 1] (default 5).
        normalization (int): both terms' kernel normalisation, ``NORMALIZE_SYMMETRIC`` (3, default, as
            Krähenbühl's and dense3dCrf's code), ``NORMALIZE_AFTER`` (2: divide by the filtered all-ones volume
            after filtering, as MONAI's CRF), ``NORMALIZE_BEFORE`` (1) or ``NO_NORMALIZATION`` (0).
        q_init (Tensor[B, L, D, H, W], the unary's dtype, optional): marginals to start from instead of
            ``softmax(-unary)``.
        checkpoint (bool): with a gradient needed, recompute the iterations in the backward instead of keeping
            them (see :func:`dense_crf_features`).

    Defaults: dense3dCrf's (Kamnitsas et al. 2017, the defaults of its ``dense3DCrfInferenceOnNiis``; SimpleCRF
    ships the same code): 5 iterations, smoothness 3 mm with weight 3, appearance 5 mm and 3 intensity levels
    with weight 5, symmetric normalisation. They assume about 1 mm voxels and 8-bit intensities; for CT in HU
    or raw MR values set ``intensity_sigma`` in those units.

    Returns:
        Q (Tensor[B, L, D, H, W], the unary's dtype): the marginals; they sum to 1 over L.

    Gradients flow to ``unary``, ``q_init`` and every compatibility given as a tensor: the exact vector-Jacobian
    product of the computed forward, as :func:`dense_crf_features`. The standard deviations, spacing and image
    have no gradient.

    Memory: see :func:`dense_crf_3d_memory` (about 210 bytes per voxel with 3 labels and one channel: 3.5 GB
    at 256^3, 28 GB at 512^3). Before allocating, the call compares that estimate with the memory available on the device and
    raises ``MemoryError`` when it cannot fit (``DEEPLAB_FAST_NO_MEMORY_CHECK=1`` skips the check).

    Raises:
        ValueError: a non-tensor or wrongly shaped ``unary`` / ``image``, dtypes, devices, C outside 1..13,
            non-positive or non-finite ``spacing`` / ``*_sigma`` (or too small for the volume's extent), a
            sigma sequence of the wrong length, a bad ``normalization``, ``iterations`` or ``*_compat``,
            NaN or inf in the image.
        MemoryError: the estimate exceeds the available memory.
        RuntimeError: from the op: NaN or ``-inf`` in the unary, a voxel with every label impossible, a bad
            ``q_init``.
    """
    spacing, gaussian_sigma, bilateral_sigma, intensity_sigma, normalization = _check_volume_args(
        unary, image, spacing, gaussian_sigma, bilateral_sigma, intensity_sigma, normalization)
    compat = [_check_compat(gaussian_compat, "gaussian_compat", unary.shape[1], unary.device),
              _check_compat(bilateral_compat, "bilateral_compat", unary.shape[1], unary.device)]
    iterations = _require_int(iterations, "iterations")
    if q_init is not None:
        _require_tensor(q_init, "q_init")
        if tuple(q_init.shape) != tuple(unary.shape):
            raise ValueError(f"dense_crf_3d: q_init must have the unary's shape {tuple(unary.shape)}, got "
                             f"{tuple(q_init.shape)}")
    if not isinstance(checkpoint, bool):
        raise ValueError(f"dense_crf_3d: checkpoint must be a bool, got {type(checkpoint).__name__}")
    _check_intensities(image, intensity_sigma)
    history = not checkpoint and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (unary, q_init, *compat))
    _check_memory(unary, image.shape[1], spacing, gaussian_sigma, iterations, history)
    b, l = unary.shape[:2]
    features = _volume_features(image, spacing, gaussian_sigma, bilateral_sigma, intensity_sigma)
    q = dense_crf_features(unary.reshape(b, l, -1), list(features), compat, [normalization, normalization],
                           iterations=iterations, q_init=None if q_init is None else q_init.reshape(b, l, -1),
                           checkpoint=checkpoint)
    return q.view(unary.shape)
