"""The fully connected (dense) CRF: mean-field inference on a permutohedral lattice.

Source: Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
NIPS 2011 (algorithm 1, section 4); the lattice is Adams, Baek & Davis, Eurographics 2010. Semantics and float
evaluation order follow Krähenbühl's densecrf code as shipped by pydensecrf (``DenseCRF2D`` with
``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``): results agree with pydensecrf2 to within 1e-4 and usually
bit for bit.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np
import torch

# The fake kernels and autograd formulas (registered on import), the normalisation types (numbered as pydensecrf's
# NormalizationType) and the ops' bounds.
from ._dense_crf_registrations import (MAX_ITERATIONS, NO_NORMALIZATION, NORMALIZE_AFTER, NORMALIZE_BEFORE,
                                       NORMALIZE_SYMMETRIC, label_stride)

__all__ = ["dense_crf", "dense_crf_features", "dense_crf_pairwise_energy", "empty_cache", "label_stride",
           "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]

Compat = Union[float, torch.Tensor, np.ndarray]


def _as_compat(compat: Compat, name: str) -> torch.Tensor:
    """A label compatibility as the op takes it: a 0-d Potts weight, an [L] diagonal or an [L, L] matrix.
    Numbers and numpy arrays become float32 tensors; tensors keep their dtype (and autograd history)."""
    if isinstance(compat, bool):
        raise ValueError(f"{name} must be a number or a float tensor/array, got bool")
    if isinstance(compat, numbers.Real):
        value = float(compat)
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise ValueError(f"{name} must be finite in float32 (|{name}| <= 3.4e38), got {compat}")
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(compat, np.ndarray):
        if compat.dtype.kind != "f":
            raise ValueError(f"{name} must hold floats, got dtype {compat.dtype}")
        return torch.from_numpy(np.ascontiguousarray(compat, dtype=np.float32))
    if isinstance(compat, torch.Tensor):
        if not compat.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {compat.dtype}")
        return compat
    raise ValueError(f"{name} must be a number, a torch.Tensor or a numpy array, got {type(compat).__name__}")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _require_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_int(x, name: str, low: int = 0, high: int = MAX_ITERATIONS) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(x).__name__}")
    if not low <= x <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return int(x)


def _require_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {type(x).__name__}")
    if not (float(x) > 0.0 and math.isfinite(float(x))):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return float(x)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def dense_crf(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: Compat = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: Compat = 10.0,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Dense CRF mean-field inference on images, as pydensecrf's ``DenseCRF2D``; differentiable.

    Equivalent to ``d = DenseCRF2D(W, H, L); d.setUnaryEnergy(unary);
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat);
    d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat);
    d.inference(iterations)`` for each image of the batch, with ``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``.

    Args:
        unary (Tensor[B, L, H, W], float32; float64 on the CPU): unary energies, i.e. negative log probabilities
            (what pydensecrf's ``setUnaryEnergy`` takes). ``+inf`` marks an impossible label; NaN and ``-inf``
            are errors.
        image (Tensor[B, 3, H, W], uint8): the RGB images, on the unary's device.
        iterations (int): mean-field steps, in [0, 2^31 - 1] (default 10). 0 returns ``softmax(-unary)``.
        gaussian_sxy (float): spatial standard deviation of the smoothness kernel, in pixels (default 3).
        gaussian_compat (float | Tensor[] | Tensor[L] | Tensor[L, L]): its label compatibility: a Potts weight
            (default 3), a diagonal, or a matrix (symmetrised), as pydensecrf's ``compat``. A tensor may be on
            the CPU or on the unary's device, and may require grad.
        bilateral_sxy (float): spatial standard deviation of the appearance kernel, in pixels (default 80).
        bilateral_srgb (float): its colour standard deviation, in 8-bit intensity levels (default 13).
        bilateral_compat (float | Tensor[] | Tensor[L] | Tensor[L, L]): its label compatibility (default Potts 10).
        checkpoint (bool): when gradients are needed, keep only the inputs and recompute the iterations in the
            backward, instead of keeping every iteration's marginals (see :func:`dense_crf_features`).

    Returns:
        Q (Tensor[B, L, H, W], the unary's dtype): the marginals after ``iterations`` steps; they sum to 1 over L.

    Gradients flow to ``unary`` and to every compatibility given as a tensor (the exact vector-Jacobian product
    of the computed forward: see :func:`dense_crf_features`). Compatibilities so large that the float32
    messages overflow (``|compat|`` near 3.4e38) saturate: those pixels are recomputed in float64.

    Raises:
        ValueError: a non-tensor ``unary`` or ``image``; a bad ``iterations``, ``*_sxy``, ``*_srgb`` or
            ``*_compat`` value; wrong dtype, shape or device (every tensor must be on the unary's device;
            compatibilities may also be on the CPU); image size or batch size not matching the unary; an empty
            batch; L = 0; a standard deviation too small for the lattice (the message gives the smallest usable
            value).
        RuntimeError: what the kernels find: NaN or -inf in the unary, a pixel whose unary is +inf for every
            label.

    Inputs need not be contiguous. The lattice of each image is built once and reused across iterations;
    ``torch.set_num_threads`` sets the parallelism, and results are identical for any thread count.
    """
    _require_tensor(unary, "unary")
    _require_tensor(image, "image")
    args = (
        _require_int(iterations, "iterations"),
        _require_positive(gaussian_sxy, "gaussian_sxy"),
        _as_compat(gaussian_compat, "gaussian_compat"),
        _require_positive(bilateral_sxy, "bilateral_sxy"),
        _require_positive(bilateral_srgb, "bilateral_srgb"),
        _as_compat(bilateral_compat, "bilateral_compat"),
    )
    if not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be a bool, got {type(checkpoint).__name__}")
    return torch.ops.deeplab_fast.dense_crf(unary, image, *args, checkpoint)


def _check_terms(features, compat, normalization):
    if isinstance(features, torch.Tensor):
        raise ValueError("features must be a sequence of tensors (one per pairwise term), not a tensor")
    features = [_require_tensor(f, f"features[{k}]") for k, f in enumerate(features)]
    compat = [_as_compat(c, f"compat[{k}]") for k, c in enumerate(compat)]
    normalization = [_require_int(n, f"normalization[{k}]", NO_NORMALIZATION, NORMALIZE_SYMMETRIC)
                     for k, n in enumerate(normalization)]
    if not (len(features) == len(compat) == len(normalization)):
        raise ValueError(
            "features, compat and normalization need one entry per pairwise term, got "
            f"{len(features)}, {len(compat)} and {len(normalization)}"
        )
    return features, compat, normalization


def dense_crf_features(
    unary: torch.Tensor,
    features: Sequence[torch.Tensor],
    compat: Sequence[Compat],
    normalization: Sequence[int] | None = None,
    *,
    iterations: int = 10,
    q_init: torch.Tensor | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Dense CRF mean-field inference with arbitrary pairwise features (pydensecrf's generic ``DenseCRF``);
    differentiable.

    Args:
        unary (Tensor[B, L, N], float32; float64 on the CPU): unary energies of N variables.
        features (list of Tensor[B, D_k, N], float32 or float64): one feature set per pairwise term, already
            divided by the kernel's standard deviations (as ``addPairwiseEnergy`` takes them); 1 <= D_k <= 16.
            The lattice is built from their float32 values.
        compat (list of float | Tensor[] | Tensor[L] | Tensor[L, L]): each term's label compatibility (a tensor
            may be on the CPU or on the unary's device).
        normalization (list of int): each term's normalisation, ``NO_NORMALIZATION`` (0),
            ``NORMALIZE_BEFORE`` (1), ``NORMALIZE_AFTER`` (2) or ``NORMALIZE_SYMMETRIC`` (3, the default).
        iterations (int): mean-field steps, in [0, 2^31 - 1] (default 10).
        q_init (Tensor[B, L, N], the unary's dtype, optional): marginals to start from instead of
            ``softmax(-unary)`` (pydensecrf's ``stepInference``).
        checkpoint (bool): see Gradients (default False).

    Returns:
        Q (Tensor[B, L, N], the unary's dtype).

    Gradients: the exact vector-Jacobian product of the forward this op computes (CRF-as-RNN, Zheng et al.,
    ICCV 2015; Krähenbühl & Koltun, ICML 2013; reference: Krähenbühl's ``DenseCRF::gradient``), with respect
    to ``unary``, ``q_init`` and every compatibility tensor (a matrix's gradient is symmetric, since the op
    symmetrises it). Each iteration's transposed lattice filter is the same splat and slice with the blur axes
    in reverse order (normalisations swapped as in ``DenseKernel::filter(..., transpose)``); one transposed
    filter per term and iteration gives both the marginals' and the compatibilities' gradients, so the backward
    costs about one forward. Memory between forward and backward: the marginals every iteration starts from,
    ``B * iterations * N * S`` values (S: L rounded up to 8 on the CPU, to 4 on CUDA), or, with
    ``checkpoint=True``, only the inputs (the backward then reruns the iterations, holding that history
    until it is done). The backward is deterministic (no float atomics) and independent of the thread count.
    Gradients with respect to ``features`` (the kernel bandwidths) are not implemented: a backward that needs
    them raises ``NotImplementedError`` naming the argument.

    Raises:
        ValueError / RuntimeError: as :func:`dense_crf`, naming the offending argument.
    """
    _require_tensor(unary, "unary")
    if normalization is None:
        normalization = [NORMALIZE_SYMMETRIC] * len(features)
    features, compat, normalization = _check_terms(features, compat, normalization)
    if q_init is not None:
        _require_tensor(q_init, "q_init")
    args = (unary, features, compat, normalization, _require_int(iterations, "iterations"), q_init)
    if not checkpoint and _wants_grad(unary, q_init, *compat):
        return torch.ops.deeplab_fast.dense_crf_features_with_history(*args)[0]
    return torch.ops.deeplab_fast.dense_crf_features(*args)


def dense_crf_pairwise_energy(
    q: torch.Tensor,
    features: Sequence[torch.Tensor],
    compat: Sequence[Compat],
    normalization: Sequence[int] | None = None,
) -> torch.Tensor:
    """The summed pairwise messages ``sum_k compat_k(K_k q)`` (Tensor[B, L, N]) for marginals ``q``.

    This is what pydensecrf's ``PairwisePotential::apply`` returns, summed over terms; with Potts
    compatibility ``w`` a term contributes ``-w * K q``. ``(q * result).sum()`` is the pairwise part of
    pydensecrf's ``klDivergence``. Arguments as :func:`dense_crf_features`; not differentiable. With
    compatibilities near float32's range the messages may overflow to +-inf.
    """
    _require_tensor(q, "q")
    if normalization is None:
        normalization = [NORMALIZE_SYMMETRIC] * len(features)
    features, compat, normalization = _check_terms(features, compat, normalization)
    return torch.ops.deeplab_fast.dense_crf_pairwise_energy(q, features, compat, normalization)


def empty_cache() -> None:
    """Frees the CPU working memory that the dense CRF keeps between calls.

    Large per-call buffers (marginals, unaries, lattice values) are recycled, so that calls on images of the
    same size skip faulting in fresh memory. At most ``DEEPLAB_FAST_CPU_CACHE_MB`` MiB (environment, default
    1024; 0 disables the cache) stay cached; this releases them.
    """
    torch.ops.deeplab_fast.empty_cache()
