"""A drop-in replacement for ``pydensecrf.densecrf``, running on deeplab_fast's dense CRF custom ops.

Scripts written for pydensecrf move over by changing only their imports::

    import deeplab_fast.densecrf as dcrf                      # was: import pydensecrf.densecrf as dcrf
    from deeplab_fast.densecrf.utils import unary_from_softmax # was: from pydensecrf.utils import ...

    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(unary)                                    # float32 [L, W*H], -log probabilities
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    Q = np.array(d.inference(5))                               # float32 [L, W*H]
    labels = np.argmax(Q, axis=0).reshape(H, W)

The model is the fully connected CRF with Gaussian edge potentials and its mean-field inference from
Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011,
with the API, argument conventions, defaults and float evaluation order of pydensecrf (Lucas Beyer's Python
wrapper of Krähenbühl's densecrf code; here reimplemented, not copied). Results agree with pydensecrf2 to
1e-4 (usually bit for bit) and the MAP labels agree.

Differences from pydensecrf:

* not implemented, so ``NotImplementedError``: the learning path (``setUnaryEnergy(u, f)``,
  ``LogisticUnary``), and pairwise features with more than 16 dimensions (or none);
* bad shapes, dtypes and values raise ``ValueError`` up front where pydensecrf reads out of bounds or
  propagates NaN: e.g. a compat vector whose length is not L, NaN or -inf in the unary, non-finite features,
  non-positive ``sxy``/``srgb``; a variable whose unary is ``+inf`` for every label raises ``RuntimeError``
  (from the op) at inference;
* arrays of any float dtype and layout are accepted and copied as float32 (pydensecrf wants C-contiguous
  float32 and raises otherwise);
* ``inference``/``startInference`` return plain ``numpy.ndarray`` (pydensecrf returns an Eigen buffer wrapper
  that ``np.array`` turns into the same values).

The kernel type (``CONST_KERNEL``, ``DIAG_KERNEL``, ``FULL_KERNEL``) only selects which kernel parameters
pydensecrf's learning code may tune; it does not change inference, so all three are accepted and give the
same marginals, as in pydensecrf.
"""
from __future__ import annotations

import enum
import numbers

import numpy as np
import torch

from .._validation import MAX_INT32, positive_int
from ..ops.dense_crf import dense_crf_features, dense_crf_pairwise_energy
from ._args import compat_tensor, enum_value, float_matrix, per_axis

__all__ = [
    "KernelType",
    "NormalizationType",
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NO_NORMALIZATION",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NORMALIZE_SYMMETRIC",
    "Unary",
    "ConstUnary",
    "LogisticUnary",
    "DenseCRF",
    "DenseCRF2D",
]

# The lattice of deeplab_fast's op handles 1..16 feature dimensions.
_MAX_FEATURE_DIM = 16


class NormalizationType(enum.IntEnum):
    """Kernel normalisation, numbered as pydensecrf's ``NormalizationType`` (densecrf/include/pairwise.h)."""

    NO_NORMALIZATION = 0  # none: the raw Gaussian sums
    NORMALIZE_BEFORE = 1  # scale the input by 1 / (K 1) before filtering
    NORMALIZE_AFTER = 2  # scale the output by 1 / (K 1) after filtering (the NIPS 2011 normalisation)
    NORMALIZE_SYMMETRIC = 3  # 1 / sqrt(K 1) before and after (pydensecrf's default)


class KernelType(enum.IntEnum):
    """Kernel parametrisation, numbered as pydensecrf's ``KernelType``. It only matters for learning."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC
CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL


# ---------------------------------------------------------------------------------------------------------
# Unary objects (pydensecrf's ``setUnary`` API).


class Unary:
    """Base class of unary energies for :meth:`DenseCRF.setUnary` (pydensecrf's ``Unary``)."""

    _energy: np.ndarray


class ConstUnary(Unary):
    """A constant unary energy, as pydensecrf's ``ConstUnary``.

    Args:
        u (ndarray[L, N], float): unary energies (negative log probabilities); copied as float32.

    Raises:
        ValueError: ``u`` is not a 2-D float array.
    """

    def __init__(self, u):
        self._energy = float_matrix(u, "u")


class LogisticUnary(Unary):
    """pydensecrf's ``LogisticUnary`` (a learnt unary ``L f``). Not implemented: raises NotImplementedError."""

    def __init__(self, L, f):
        raise NotImplementedError(
            "LogisticUnary (pydensecrf's learning path, LogisticUnaryEnergy) is not implemented in "
            "deeplab_fast.densecrf; pass precomputed energies to setUnaryEnergy(u) or ConstUnary(u)"
        )


# ---------------------------------------------------------------------------------------------------------
# The CRFs.


class DenseCRF:
    """A fully connected CRF over ``nvar`` variables with ``nlabels`` labels (pydensecrf's ``DenseCRF``).

    Energy: ``E(x) = sum_i u_i(x_i) + sum_{i<j} sum_k mu_k(x_i, x_j) k_k(f_i^k, f_j^k)`` with Gaussian kernels
    ``k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2)`` on per-term features that the caller has already divided by the
    kernel standard deviations (Krähenbühl & Koltun, NIPS 2011). Inference is mean field with permutohedral
    lattice filtering; state (unary, pairwise terms) is copied at the time it is set, as pydensecrf does.

    Args:
        nvar (int): the number of variables N (pixels), > 0.
        nlabels (int): the number of labels L, > 0.

    Raises:
        ValueError: ``nvar`` or ``nlabels`` is not a positive int.
    """

    def __init__(self, nvar: int, nlabels: int):
        self._nvar = positive_int(nvar, "nvar")
        self._nlabel = positive_int(nlabels, "nlabels")
        self._unary: np.ndarray | None = None  # [L, N] float32, None: zeros (pydensecrf: no unary set)
        self._features: list[torch.Tensor] = []  # each [1, D, N] float32
        self._compat: list[torch.Tensor] = []
        self._normalization: list[int] = []
        self._kernel: list[int] = []  # kept for reference only; it does not affect inference

    # -- setup ------------------------------------------------------------------------------------------

    def setUnaryEnergy(self, u, f=None) -> None:
        """Set the unary energy (pydensecrf's ``setUnaryEnergy``); replaces any previous one.

        Args:
            u (ndarray[L, N], float32): unary energies, i.e. negative log probabilities (see
                ``deeplab_fast.densecrf.utils.unary_from_softmax``). Other float dtypes and layouts are
                accepted and copied as float32. ``+inf`` marks an impossible label.
            f: pydensecrf's learning path (``LogisticUnaryEnergy(u, f)``). Must be None.

        Raises:
            NotImplementedError: ``f`` is not None.
            ValueError: ``u`` is not a float array of shape (nlabels, nvar), or holds NaN or -inf.
        """
        if f is not None:
            raise NotImplementedError(
                "setUnaryEnergy(u, f): the logistic unary (pydensecrf's learning path, LogisticUnaryEnergy) is "
                "not implemented in deeplab_fast.densecrf; pass precomputed energies as setUnaryEnergy(u)"
            )
        self._set_unary(u, "u")

    def setUnary(self, u: Unary) -> None:
        """Set the unary energy from a :class:`ConstUnary` (pydensecrf's ``setUnary``).

        Raises:
            ValueError: ``u`` is not a ``ConstUnary`` or its energies do not have shape (nlabels, nvar).
        """
        if not isinstance(u, Unary) or getattr(u, "_energy", None) is None:
            raise ValueError(f"setUnary takes a ConstUnary, got {type(u).__name__}")
        self._set_unary(u._energy, "u")

    def _set_unary(self, u, name: str) -> None:
        arr = float_matrix(u, name)
        if arr.shape != (self._nlabel, self._nvar):
            raise ValueError(
                f"Bad shape for unary energy {name} (need {(self._nlabel, self._nvar)} = (nlabels, nvar), "
                f"got {arr.shape})"
            )
        if np.isnan(arr).any():
            raise ValueError(f"unary energy {name} contains NaN")
        if (arr == -np.inf).any():
            raise ValueError(f"unary energy {name} contains -inf")
        self._unary = arr

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Add a Gaussian pairwise term on arbitrary features (pydensecrf's ``addPairwiseEnergy``).

        Args:
            features (ndarray[D, N], float32): each variable's feature vector, already divided by the kernel's
                standard deviations (see ``utils.create_pairwise_gaussian`` / ``create_pairwise_bilateral``);
                1 <= D <= 16. Copied as float32.
            compat (float | ndarray[L] | ndarray[L, L]): label compatibility: a Potts weight ``w`` (the term
                adds ``-w K Q``, rewarding equal labels), a diagonal, or a matrix (symmetrised as
                ``(W + W^T) / 2``, as pydensecrf does).
            kernel (KernelType): ``CONST_KERNEL``, ``DIAG_KERNEL`` (default) or ``FULL_KERNEL``. Only
                pydensecrf's learning code uses it; inference is the same for all three.
            normalization (NormalizationType): ``NO_NORMALIZATION``, ``NORMALIZE_BEFORE``,
                ``NORMALIZE_AFTER`` or ``NORMALIZE_SYMMETRIC`` (default).

        Raises:
            ValueError: ``features`` not a 2-D float array with nvar columns, or not finite; a bad ``compat``
                (dimension > 2, or length not L); an unknown ``kernel`` or ``normalization``.
            NotImplementedError: D = 0 or D > 16 (outside what the lattice implements).
        """
        feats = float_matrix(features, "features")
        if feats.shape[1] != self._nvar:
            raise ValueError(
                f"Bad shape for pairwise energy features (need (?, {self._nvar}) = (D, nvar), got {feats.shape})"
            )
        self._add_term(feats, compat, kernel, normalization)

    def _add_term(self, feats: np.ndarray, compat, kernel, normalization) -> None:
        d = feats.shape[0]
        if not 1 <= d <= _MAX_FEATURE_DIM:
            raise NotImplementedError(
                f"features has {d} dimensions; deeplab_fast's lattice implements 1 to {_MAX_FEATURE_DIM}"
            )
        if not np.isfinite(feats).all():
            raise ValueError("features must be finite (check the standard deviations sxy / srgb)")
        c = compat_tensor(compat, self._nlabel)
        k = enum_value(kernel, KernelType, "kernel")
        n = enum_value(normalization, NormalizationType, "normalization")
        self._features.append(torch.from_numpy(feats)[None])
        self._compat.append(c)
        self._normalization.append(n)
        self._kernel.append(k)

    # -- inference --------------------------------------------------------------------------------------

    def _unary_tensor(self) -> torch.Tensor:
        if self._unary is None:
            return torch.zeros(1, self._nlabel, self._nvar, dtype=torch.float32)
        return torch.from_numpy(self._unary)[None]

    def _check_q(self, Q, name: str = "Q") -> np.ndarray:
        if not isinstance(Q, np.ndarray):
            raise ValueError(f"{name} must be a numpy array (as returned by startInference), got {type(Q).__name__}")
        if Q.dtype.kind != "f":
            raise ValueError(f"{name} must be a float array, got dtype {Q.dtype}")
        if Q.shape != (self._nlabel, self._nvar):
            raise ValueError(f"{name} must have shape {(self._nlabel, self._nvar)} = (nlabels, nvar), got {Q.shape}")
        if not np.isfinite(Q).all():
            raise ValueError(f"{name} contains NaN or inf")
        return np.ascontiguousarray(Q, dtype=np.float32)

    def inference(self, niter: int) -> np.ndarray:
        """Run ``niter`` mean-field iterations from ``softmax(-unary)`` (pydensecrf's ``inference``).

        Args:
            niter (int): the number of iterations; <= 0 returns ``softmax(-unary)``, as pydensecrf.

        Returns:
            ndarray[L, N], float32: the marginals Q; each column sums to 1. With no unary set the unary is
            zero; with no pairwise term every iteration gives ``softmax(-unary)`` again.

        Raises:
            TypeError: ``niter`` is not an int.
            RuntimeError: from the op, e.g. features too large for the lattice, or a variable whose unary is
                ``+inf`` for every label.
        """
        if isinstance(niter, bool) or not isinstance(niter, numbers.Integral):
            raise TypeError(f"niter must be an int, got {type(niter).__name__}")
        n = max(int(niter), 0)
        if n > MAX_INT32:
            raise ValueError(f"niter must be at most {MAX_INT32}, got {niter}")
        if n == 0:  # no lattice needed
            q = dense_crf_features(self._unary_tensor(), [], [], [], iterations=0)
        else:
            q = dense_crf_features(self._unary_tensor(), self._features, self._compat, self._normalization,
                                   iterations=n)
        return q[0].numpy()

    def startInference(self):
        """Start step-by-step inference (pydensecrf's ``startInference``).

        Returns:
            (Q, tmp1, tmp2): ``Q`` (ndarray[L, N], float32) is ``softmax(-unary)``, or all zeros when no unary
            has been set (as pydensecrf: the first step from zeros then gives the uniform distribution, so with
            no unary ``n`` steps equal ``inference(n - 1)``). ``tmp1`` and ``tmp2``
            are empty float32 arrays of shape (0, 0), scratch buffers kept for API compatibility (pydensecrf's
            also read back as (0, 0)); :meth:`stepInference` does not use them.
        """
        if self._unary is None:
            q = np.zeros((self._nlabel, self._nvar), dtype=np.float32)
        else:
            q = dense_crf_features(self._unary_tensor(), [], [], [], iterations=0)[0].numpy()
        return q, np.empty((0, 0), dtype=np.float32), np.empty((0, 0), dtype=np.float32)

    def stepInference(self, Q, tmp1=None, tmp2=None) -> None:
        """One mean-field iteration from ``Q``, written back into ``Q`` in place (pydensecrf's ``stepInference``).

        ``Q <- softmax(-unary - sum_k pairwise_k(Q))``. Each call rebuilds the lattices, so ``inference(n)`` is
        faster than ``n`` steps; the results are the same.

        Args:
            Q (ndarray[L, N], float32): the current marginals, e.g. from :meth:`startInference`; overwritten.
            tmp1, tmp2: scratch buffers from :meth:`startInference`; accepted and ignored.

        Raises:
            ValueError: ``Q`` is not a writeable float ndarray of shape (nlabels, nvar), or is not finite.
        """
        q = self._check_q(Q)
        if not Q.flags.writeable:
            raise ValueError("Q must be writeable: stepInference updates it in place")
        out = dense_crf_features(self._unary_tensor(), self._features, self._compat, self._normalization,
                                 iterations=1, q_init=torch.from_numpy(q)[None])
        Q[...] = out[0].numpy()

    def klDivergence(self, Q) -> float:
        """The KL-divergence objective of marginals ``Q``, up to a constant (pydensecrf's ``klDivergence``).

        Evaluated as pydensecrf's C++ does, accumulated in double precision:
        ``sum Q log(max(Q, 1e-20)) + sum unary * Q + sum_k sum Q * pairwise_k(Q)``, where ``pairwise_k(Q)`` is the
        term's message (``-w K Q`` for a Potts weight ``w``).

        Args:
            Q (ndarray[L, N], float): marginals.

        Returns:
            float.

        Raises:
            ValueError: ``Q`` is not a float ndarray of shape (nlabels, nvar), or is not finite.
        """
        q = self._check_q(Q)
        q64 = q.astype(np.float64)
        kl = float(np.sum(q64 * np.log(np.maximum(q, np.float32(1e-20)).astype(np.float64))))
        if self._unary is not None:
            kl += float(np.sum(self._unary.astype(np.float64) * q64))
        if self._features:
            e = dense_crf_pairwise_energy(torch.from_numpy(q)[None], self._features, self._compat,
                                          self._normalization)
            kl += float(np.sum(q64 * e[0].numpy().astype(np.float64)))
        return kl


class DenseCRF2D(DenseCRF):
    """A fully connected CRF over the pixels of a W x H image (pydensecrf's ``DenseCRF2D``).

    Pixel ``(x, y)`` (column x, row y) is variable ``y * W + x``, so unaries of shape (L, H, W) reshape to
    (L, W*H) in C order.

    Args:
        w (int): the image width W, > 0.
        h (int): the image height H, > 0.
        nlabels (int): the number of labels L, > 0.

    (Positional as ``DenseCRF2D(W, H, L)``; the keyword names are pydensecrf's.)

    Raises:
        ValueError: a non-positive or non-int ``w``, ``h`` or ``nlabels``.
    """

    def __init__(self, w: int, h: int, nlabels: int):
        self._w = positive_int(w, "w")
        self._h = positive_int(h, "h")
        super().__init__(self._w * self._h, nlabels)

    def _positions(self, sx: np.float32, sy: np.float32):
        # float32 division of the integer coordinate, as pydensecrf's C++ (feature order x, y).
        fx = np.arange(self._w, dtype=np.float32) / sx
        fy = np.arange(self._h, dtype=np.float32) / sy
        return (np.broadcast_to(fx[None, :], (self._h, self._w)).reshape(-1),
                np.broadcast_to(fy[:, None], (self._h, self._w)).reshape(-1))

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Add the smoothness kernel on pixel positions (pydensecrf's ``addPairwiseGaussian``).

        Features ``(x / sx, y / sy)``, x the column. The usual setting is ``sxy=3, compat=3``.

        Args:
            sxy (float | (float, float)): spatial standard deviation in pixels, or ``(sx, sy)``.
            compat, kernel, normalization: as :meth:`DenseCRF.addPairwiseEnergy`.

        Raises:
            ValueError: ``sxy`` not positive and finite or not 1 or 2 values; a bad ``compat``, ``kernel`` or
                ``normalization``.
        """
        sx, sy = per_axis(sxy, 2, "sxy")
        fx, fy = self._positions(sx, sy)
        self._add_term(np.ascontiguousarray(np.stack([fx, fy])), compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,
                             normalization=NORMALIZE_SYMMETRIC) -> None:
        """Add the appearance kernel on positions and colours (pydensecrf's ``addPairwiseBilateral``).

        Features ``(x / sx, y / sy, r / sr, g / sg, b / sb)``. The usual settings are ``sxy=80, srgb=13,
        compat=10`` (pydensecrf's example) and ``sxy=67, srgb=3, compat=4`` (DeepLab v2).

        Args:
            sxy (float | (float, float)): spatial standard deviation in pixels, or ``(sx, sy)``.
            srgb (float | (float, float, float)): colour standard deviation in 8-bit levels, or ``(sr, sg, sb)``.
            rgbim (ndarray[H, W, 3], uint8): the RGB image (copied).
            compat, kernel, normalization: as :meth:`DenseCRF.addPairwiseEnergy`.

        Raises:
            ValueError: ``rgbim`` not uint8, not of shape (H, W, 3); ``sxy`` / ``srgb`` not positive and
                finite or of the wrong length; a bad ``compat``, ``kernel`` or ``normalization``.
        """
        sx, sy = per_axis(sxy, 2, "sxy")
        sr, sg, sb = per_axis(srgb, 3, "srgb")
        im = np.asarray(rgbim)
        if im.dtype != np.uint8:
            raise ValueError(f"rgbim must be a uint8 array of shape (H, W, 3), got dtype {im.dtype}")
        if im.ndim != 3 or im.shape[0] != self._h or im.shape[1] != self._w:
            raise ValueError(f"Bad shape for rgbim (need {(self._h, self._w, 3)} = (H, W, 3), got {im.shape})")
        if im.shape[2] != 3:
            raise ValueError(
                f"rgbim must have 3 channels (RGB), got shape {im.shape}; for other images build the features "
                "with utils.create_pairwise_bilateral and add them through addPairwiseEnergy"
            )
        fx, fy = self._positions(sx, sy)
        colours = im.reshape(-1, 3).astype(np.float32)
        feats = np.stack([fx, fy, colours[:, 0] / sr, colours[:, 1] / sg, colours[:, 2] / sb])
        self._add_term(np.ascontiguousarray(feats, dtype=np.float32), compat, kernel, normalization)
