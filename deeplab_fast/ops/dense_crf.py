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

__all__ = ["dense_crf", "dense_crf_features", "dense_crf_pairwise_energy", "empty_cache"]

# Normalisation types, numbered as pydensecrf's NormalizationType.
NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3

Compat = Union[float, torch.Tensor, np.ndarray]


def _as_compat(compat: Compat, name: str) -> torch.Tensor:
    """A label compatibility as the op takes it: a 0-d Potts weight, an [L] diagonal or an [L, L] matrix."""
    if isinstance(compat, bool):
        raise ValueError(f"{name} must be a number or a float tensor/array, got bool")
    if isinstance(compat, numbers.Real):
        return torch.tensor(float(compat), dtype=torch.float32)
    if isinstance(compat, np.ndarray):
        if compat.dtype.kind != "f":
            raise ValueError(f"{name} must hold floats, got dtype {compat.dtype}")
        return torch.from_numpy(np.ascontiguousarray(compat, dtype=np.float32))
    if isinstance(compat, torch.Tensor):
        if not compat.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {compat.dtype}")
        return compat.to(torch.float32)
    raise ValueError(f"{name} must be a number, a torch.Tensor or a numpy array, got {type(compat).__name__}")


def _require_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(x).__name__}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return int(x)


def _require_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {type(x).__name__}")
    if not (float(x) > 0.0 and math.isfinite(float(x))):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return float(x)


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
) -> torch.Tensor:
    """Dense CRF mean-field inference on images, as pydensecrf's ``DenseCRF2D``.

    Equivalent to ``d = DenseCRF2D(W, H, L); d.setUnaryEnergy(unary);
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat);
    d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat);
    d.inference(iterations)`` for each image of the batch, with ``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``.

    Args:
        unary (Tensor[B, L, H, W], float32): unary energies, i.e. negative log probabilities (what
            pydensecrf's ``setUnaryEnergy`` takes). ``+inf`` marks an impossible label; NaN and ``-inf`` are
            errors.
        image (Tensor[B, 3, H, W], uint8): the RGB images, on the unary's device.
        iterations (int): mean-field steps, >= 0 (default 10). 0 returns ``softmax(-unary)``.
        gaussian_sxy (float): spatial standard deviation of the smoothness kernel, in pixels (default 3).
        gaussian_compat (float | Tensor[L] | Tensor[L, L]): its label compatibility: a Potts weight
            (default 3), a diagonal, or a matrix (symmetrised), as pydensecrf's ``compat``.
        bilateral_sxy (float): spatial standard deviation of the appearance kernel, in pixels (default 80).
        bilateral_srgb (float): its colour standard deviation, in 8-bit intensity levels (default 13).
        bilateral_compat (float | Tensor[L] | Tensor[L, L]): its label compatibility (default Potts 10).

    Returns:
        Q (Tensor[B, L, H, W], float32): the marginals after ``iterations`` steps; they sum to 1 over L.

    Raises:
        ValueError: a non-tensor ``unary`` or ``image``, or a bad ``iterations``, ``*_sxy``, ``*_srgb`` or
            ``*_compat`` value.
        RuntimeError: wrong dtype, shape or device; image size or batch size not matching the unary; an empty
            batch; L = 0; NaN or -inf in the unary; coordinates too large for the lattice.

    Inputs need not be contiguous. The lattice of each image is built once and reused across iterations;
    ``torch.set_num_threads`` sets the parallelism, and results are identical for any thread count.
    """
    _require_tensor(unary, "unary")
    _require_tensor(image, "image")
    return torch.ops.deeplab_fast.dense_crf(
        unary,
        image,
        _require_int(iterations, "iterations"),
        _require_positive(gaussian_sxy, "gaussian_sxy"),
        _as_compat(gaussian_compat, "gaussian_compat"),
        _require_positive(bilateral_sxy, "bilateral_sxy"),
        _require_positive(bilateral_srgb, "bilateral_srgb"),
        _as_compat(bilateral_compat, "bilateral_compat"),
    )


def _check_terms(features, compat, normalization):
    if isinstance(features, torch.Tensor):
        raise ValueError("features must be a sequence of tensors (one per pairwise term), not a tensor")
    features = [_require_tensor(f, f"features[{k}]") for k, f in enumerate(features)]
    compat = [_as_compat(c, f"compat[{k}]") for k, c in enumerate(compat)]
    normalization = [int(n) for n in normalization]
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
) -> torch.Tensor:
    """Dense CRF mean-field inference with arbitrary pairwise features (pydensecrf's generic ``DenseCRF``).

    Args:
        unary (Tensor[B, L, N], float32): unary energies of N variables.
        features (list of Tensor[B, D_k, N], float32): one feature set per pairwise term, already divided by
            the kernel's standard deviations (as ``addPairwiseEnergy`` takes them); 1 <= D_k <= 16.
        compat (list of float | Tensor[L] | Tensor[L, L]): each term's label compatibility.
        normalization (list of int): each term's normalisation, ``NO_NORMALIZATION`` (0),
            ``NORMALIZE_BEFORE`` (1), ``NORMALIZE_AFTER`` (2) or ``NORMALIZE_SYMMETRIC`` (3, the default).
        iterations (int): mean-field steps (default 10).
        q_init (Tensor[B, L, N], float32, optional): marginals to start from instead of ``softmax(-unary)``
            (pydensecrf's ``stepInference``).

    Returns:
        Q (Tensor[B, L, N], float32).

    Raises:
        ValueError / RuntimeError: as :func:`dense_crf`, naming the offending argument.
    """
    _require_tensor(unary, "unary")
    if normalization is None:
        normalization = [NORMALIZE_SYMMETRIC] * len(features)
    features, compat, normalization = _check_terms(features, compat, normalization)
    if q_init is not None:
        _require_tensor(q_init, "q_init")
    return torch.ops.deeplab_fast.dense_crf_features(
        unary, features, compat, normalization, _require_int(iterations, "iterations"), q_init
    )


def dense_crf_pairwise_energy(
    q: torch.Tensor,
    features: Sequence[torch.Tensor],
    compat: Sequence[Compat],
    normalization: Sequence[int] | None = None,
) -> torch.Tensor:
    """The summed pairwise messages ``sum_k compat_k(K_k q)`` (Tensor[B, L, N]) for marginals ``q``.

    This is what pydensecrf's ``PairwisePotential::apply`` returns, summed over terms; with Potts
    compatibility ``w`` a term contributes ``-w * K q``. ``(q * result).sum()`` is the pairwise part of
    pydensecrf's ``klDivergence``. Arguments as :func:`dense_crf_features`.
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


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, so torch.compile and FakeTensor tracing go through the ops.


@torch.library.register_fake("deeplab_fast::dense_crf")
def _dense_crf_fake(unary, image, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                    bilateral_compat):
    torch._check(unary.dim() == 4, lambda: f"dense_crf: unary must be 4-D [B, L, H, W], got {unary.dim()}-D")
    torch._check(image.dim() == 4, lambda: f"dense_crf: image must be 4-D [B, 3, H, W], got {image.dim()}-D")
    torch._check(unary.dtype == torch.float32, lambda: f"dense_crf: unary must be float32, got {unary.dtype}")
    torch._check(image.dtype == torch.uint8, lambda: f"dense_crf: image must be uint8 RGB, got {image.dtype}")
    return unary.new_empty(unary.shape, dtype=torch.float32)


@torch.library.register_fake("deeplab_fast::dense_crf_features")
def _dense_crf_features_fake(unary, features, compat, normalization, iterations, q_init):
    torch._check(unary.dim() == 3, lambda: f"dense_crf: unary must be 3-D [B, L, N], got {unary.dim()}-D")
    return unary.new_empty(unary.shape, dtype=torch.float32)


@torch.library.register_fake("deeplab_fast::dense_crf_pairwise_energy")
def _dense_crf_pairwise_energy_fake(q, features, compat, normalization):
    torch._check(q.dim() == 3, lambda: f"dense_crf: q must be 3-D [B, L, N], got {q.dim()}-D")
    return q.new_empty(q.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Autograd: the dense CRF here is inference (post-processing) only. Gradients are refused with a clear error
# rather than silently dropped.


def _no_backward(ctx, *grads):
    raise NotImplementedError(
        f"{ctx.op_name} has no backward: deeplab_fast's dense CRF is inference (post-processing) only. "
        "Detach its inputs, or run it under torch.no_grad()."
    )


def _register_no_backward(name: str):
    def setup_context(ctx, inputs, output):
        ctx.op_name = f"deeplab_fast::{name}"

    torch.library.register_autograd(f"deeplab_fast::{name}", _no_backward, setup_context=setup_context)


for _name in ("dense_crf", "dense_crf_features", "dense_crf_pairwise_energy"):
    _register_no_backward(_name)
