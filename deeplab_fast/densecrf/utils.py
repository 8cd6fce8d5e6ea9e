"""Helpers that build unaries and pairwise features, with the API of ``pydensecrf.utils``.

Each function returns what its pydensecrf namesake returns, value for value (float32, same layout and
feature order), so scripts move over by changing only the import. Source: pydensecrf's ``utils.py``
(Lucas Beyer et al., MIT licence); reimplemented here.
"""
from __future__ import annotations

from numbers import Number

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax", "create_pairwise_gaussian", "create_pairwise_bilateral"]


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energies from a label map, trusting each label with probability ``gt_prob``.

    Args:
        labels (ndarray[...], int): a label per variable (any shape; flattened in C order).
        n_labels (int): the number of labels L. With ``zero_unsure``, label 0 means "unknown" and is not counted,
            so labels run 1..L.
        gt_prob (float): the probability given to the annotated label, in (0, 1); the other L - 1 labels share
            the rest.
        zero_unsure (bool): treat label 0 as unknown (uniform probability) (default True).

    Returns:
        ndarray[L, N], float32: ``-log`` probabilities.

    Raises:
        ValueError: ``gt_prob`` outside (0, 1), ``n_labels`` < 2, or labels outside the valid range.
    """
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    if n_labels < 2:
        raise ValueError(f"n_labels must be >= 2, got {n_labels}")
    labels = np.asarray(labels).flatten()
    lo, hi = (0, n_labels) if zero_unsure else (0, n_labels - 1)
    if labels.size and (labels.min() < lo or labels.max() > hi):
        raise ValueError(f"labels must lie in [{lo}, {hi}] (zero_unsure={zero_unsure}), got "
                         f"[{labels.min()}, {labels.max()}]")
    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)
    unary = np.full((n_labels, len(labels)), n_energy, dtype=np.float32)
    unary[labels - 1 if zero_unsure else labels, np.arange(unary.shape[1])] = p_energy
    if zero_unsure:
        unary[:, labels == 0] = -np.log(1.0 / n_labels)
    return unary


def unary_from_softmax(sm, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """Unary energies ``-log(p)`` from class probabilities.

    Args:
        sm (ndarray[L, ...], float): probabilities, classes first; the other axes are flattened.
        scale (float, optional): in (0, 1]: mix with the uniform distribution, ``scale * p + (1 - scale) / L``.
        clip (float, optional): lower bound on the probabilities before the log (default 1e-5); None: no clip.

    Returns:
        ndarray[L, N], float32.
    """
    sm = np.asarray(sm)
    num_cls = sm.shape[0]
    if scale is not None:
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / num_cls)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([num_cls, -1]).astype(np.float32)


def _mesh(shape) -> np.ndarray:
    return np.array(np.meshgrid(*[range(s) for s in shape], indexing="ij"), dtype=np.float32)


def create_pairwise_gaussian(sdims, shape) -> np.ndarray:
    """Positions divided by their standard deviations, for a Gaussian (smoothness) pairwise term.

    Args:
        sdims (sequence of float): a standard deviation per axis, in pixels, e.g. ``(3, 3)``.
        shape (sequence of int): the grid shape, e.g. ``(H, W)``.

    Returns:
        ndarray[len(shape), prod(shape)], float32: coordinate i of every variable divided by ``sdims[i]``; axis
        order as ``shape`` (so (y, x) for an image).
    """
    mesh = _mesh(shape)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    return mesh.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim: int = -1) -> np.ndarray:
    """Positions and channel values divided by their standard deviations, for a bilateral pairwise term.

    Args:
        sdims (sequence of float): a spatial standard deviation per axis, in pixels, e.g. ``(80, 80)``.
        schan (float or sequence of float): a standard deviation per channel, e.g. ``(13, 13, 13)`` for RGB.
        img (ndarray): the image, e.g. ``[H, W, 3]``.
        chdim (int): the channel axis of ``img``, or -1 for an image without one (default -1).

    Returns:
        ndarray[len(sdims) + C, N], float32: the scaled coordinates (in ``img``'s axis order) then channels.
    """
    if chdim == -1:
        im_feat = img[np.newaxis].astype(np.float32)
    else:
        im_feat = np.rollaxis(img, chdim).astype(np.float32)
    if isinstance(schan, Number):
        im_feat /= schan
    else:
        for i, s in enumerate(schan):
            im_feat[i] /= s
    mesh = _mesh(im_feat.shape[1:])
    for i, s in enumerate(sdims):
        mesh[i] /= s
    feats = np.concatenate([mesh, im_feat])
    return feats.reshape([feats.shape[0], -1])
