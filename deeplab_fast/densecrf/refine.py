"""Refining a coarse annotation of a photo with the dense CRF, as pydensecrf's ``examples/inference.py`` does (its
generic ``DenseCRF`` branch), pixel for pixel; and the side-by-side overlay of the result. ``deeplab-fast crf``
and ``deeplab-fast demo`` call these.

* every distinct colour of an RGB annotation is a label; pure black (0, 0, 0) means "unknown". A 16-bit
  greyscale annotation ([H, W] uint16, see :func:`deeplab_fast.io.load_annotation`) is decoded by value: every
  distinct value is a label, 0 means "unknown";
* the unary trusts each annotated pixel with probability ``gt_prob`` (``unary_from_labels``); unknown pixels get
  a uniform distribution. An annotation without any unknown pixel has no unknown label (``zero_unsure=False``);
* two pairwise terms, both ``NORMALIZE_SYMMETRIC`` with Potts compatibilities: a Gaussian (smoothness) one on
  the pixel positions ``(y, x) / gaussian_sxy``, and a bilateral (appearance) one on ``(y, x) / bilateral_sxy``
  and ``(r, g, b) / bilateral_srgb``, in that feature order (the permutohedral lattice is not rotation
  invariant, so the order matters for exact reproduction);
* ``iterations`` mean-field steps, then each pixel takes the colour (or value) of its most probable label.

Errors are ValueErrors whose messages name the inputs (``image_name``, ``anno_name``) and the parameters.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["CrfParams", "RefineResult", "decode_annotation", "refine_annotation", "make_overlay",
           "std_dev_problems"]

# The lattice's limit on a scaled, elevated feature coordinate (csrc/dense_crf/lattice_math.h, kMaxCoordinate).
_MAX_LATTICE_COORDINATE = 2.0 ** 22
_FLOAT32 = np.finfo(np.float32)


@dataclass(frozen=True)
class CrfParams:
    """The CRF settings of ``deeplab-fast crf``; the defaults are those of pydensecrf's example."""

    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 5
    max_labels: int = 256


@dataclass
class RefineResult:
    result: np.ndarray  # the refined labelling: [H, W, 3] uint8 colours, or [H, W] uint16 values
    unknown: np.ndarray  # [H, W] bool, the annotation's unknown pixels
    n_labels: int
    has_unknown: bool
    crf_seconds: float


def _size(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def decode_annotation(anno: np.ndarray):
    """Colours (or 16-bit values) to labels as pydensecrf's example does.

    ``anno``: [H, W, 3] uint8 RGB, or [H, W] integer values. Returns ``(labels [N] int64, codes [L] uint32,
    has_unknown)``: the codes are colours as 0xBBGGRR (RGB) or the values; with black / 0 present, label 0 is
    unknown and labels 1..L index ``codes``; without, labels 0..L-1 index ``codes``.
    """
    if anno.ndim == 2:
        code = anno.astype(np.uint32)
    else:
        a = anno.astype(np.uint32)
        code = a[..., 0] + (a[..., 1] << 8) + (a[..., 2] << 16)
    codes, labels = np.unique(code, return_inverse=True)
    labels = labels.reshape(-1)
    has_unknown = bool(codes[0] == 0)
    if has_unknown:
        codes = codes[1:]
    return labels, codes, has_unknown


def _code_name(c: int, values: bool) -> str:
    if values:
        return f"value {c}"
    return f"colour #{c & 0xFF:02x}{(c >> 8) & 0xFF:02x}{(c >> 16) & 0xFF:02x}"


def _max_scaled_coordinate(extents_over_std) -> float:
    """An upper bound of |elevated coordinate| / (d + 1) in the lattice embedding (lattice_math.h) for features
    whose coordinate j lies in [0, extents_over_std[j]]."""
    d = len(extents_over_std)
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    cf = [e * inv_std / math.sqrt((j + 2) * (j + 1)) for j, e in enumerate(extents_over_std)]
    bound = 0.0
    for i in range(d + 1):  # elevated[i] = sum_{k > i} cf_k - i * cf_i (cf 1-based as in the C++ loop)
        tail = sum(cf[i:])
        bound = max(bound, tail + (i * cf[i - 1] if i > 0 else 0.0))
    return bound / (d + 1)


def std_dev_problems(params: CrfParams, height: int, width: int) -> list:
    """The standard deviations of ``params`` that cannot work on a ``height`` x ``width`` image: a list of
    ``(field name, value, smallest usable value)``. A standard deviation is unusable when it is not a positive
    float32 (it underflows to 0 or overflows), or when it scales the image's coordinates beyond the lattice's
    range (2^22). Empty when all are usable."""
    extent = float(max(height, width) - 1)
    spatial = [float(height - 1), float(width - 1)]
    terms = {  # field -> (the term's features as (extent, std field), ...)
        "gaussian_sxy": [(e, "gaussian_sxy") for e in spatial],
        "bilateral_sxy": [(e, "bilateral_sxy") for e in spatial] + [(255.0, "bilateral_srgb")] * 3,
        "bilateral_srgb": [(e, "bilateral_sxy") for e in spatial] + [(255.0, "bilateral_srgb")] * 3,
    }
    values = {f.name: float(getattr(params, f.name)) for f in fields(params)}
    problems = []
    for name, feats in terms.items():
        value = values[name]

        def fits(sigma: float) -> bool:
            stds = {**values, name: sigma}
            return _max_scaled_coordinate([e / stds[s] if stds[s] > 0 else math.inf for e, s in feats]) \
                < _MAX_LATTICE_COORDINATE

        lo, top = max(float(_FLOAT32.tiny), extent / float(_FLOAT32.max)), float(_FLOAT32.max)
        representable = math.isfinite(value) and lo <= value <= top
        if representable and fits(value):
            continue
        hi = max(value, 1.0) if representable else 1.0  # a value that fits, for the bisection below
        while hi <= top and not fits(hi):
            hi *= 2.0
        if hi > top:  # no value fits: another standard deviation is the one out of range
            if not representable:
                problems.append((name, value, lo))
            continue
        a, b = math.log(lo), math.log(hi)  # the smallest usable value, by bisection in log space
        for _ in range(80):
            m = 0.5 * (a + b)
            a, b = (a, m) if fits(math.exp(m)) else (m, b)
        problems.append((name, value, math.exp(b)))
    return problems


def refine_annotation(image: np.ndarray, anno: np.ndarray, params: CrfParams = CrfParams(),
                      *, image_name: str = "IMAGE", anno_name: str = "ANNO") -> RefineResult:
    """Refine an annotation of ``image`` ([H, W, 3] uint8) with the dense CRF. ``anno``: [H, W, 3] uint8 colours
    or [H, W] 16-bit values (see the module docstring).

    Raises ValueError for a size mismatch, an unusable annotation or unusable parameters.
    """
    import torch

    from ..ops.dense_crf import NORMALIZE_SYMMETRIC, dense_crf_features
    from .utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_labels

    if anno.shape[:2] != image.shape[:2]:
        hint = ""
        if anno.shape[:2] == image.shape[1::-1]:
            hint = " (width and height are swapped: is one of them rotated, e.g. by an EXIF orientation tag?)"
        raise ValueError(f"{anno_name} is {_size(anno)} but {image_name} is {_size(image)}; the annotation "
                         f"must have the image's size{hint}")
    height, width = image.shape[:2]
    problems = std_dev_problems(params, height, width)
    if problems:
        name, value, usable = problems[0]
        raise ValueError(f"{name} {value:g} cannot be used on {image_name} ({width}x{height}): the scaled "
                         f"coordinates would leave the lattice's range; the usable range is {usable:.3g} to "
                         f"{float(_FLOAT32.max):.3g}")
    values = anno.ndim == 2
    labels, codes, has_unknown = decode_annotation(anno)
    n_labels = len(codes)
    unknown_word = "0 (unknown)" if values else "black (unknown)"
    if n_labels < 2:
        found = (f"only {unknown_word} pixels" if n_labels == 0 else
                 f"a single label {_code_name(int(codes[0]), values)}" + (f" besides {unknown_word}" if has_unknown
                                                                         else ""))
        kind = "values" if values else "colours"
        raise ValueError(f"{anno_name} needs at least 2 label {kind} ({unknown_word.split()[0]} means unknown), "
                         f"found {found}")
    if n_labels > params.max_labels:
        if values:
            raise ValueError(f"{anno_name} has {n_labels} distinct values, each of which would be a label (limit "
                             f"--max-labels {params.max_labels}); raise --max-labels if that is intended")
        raise ValueError(f"{anno_name} has {n_labels} distinct colours, each of which would be a label (limit "
                         f"--max-labels {params.max_labels}); is it a lossy (JPEG) or anti-aliased image? Use a "
                         "PNG painted with flat colours, or raise --max-labels")

    start = time.perf_counter()
    unary = unary_from_labels(labels, n_labels, params.gt_prob, zero_unsure=has_unknown)
    gaussian = create_pairwise_gaussian(sdims=(params.gaussian_sxy, params.gaussian_sxy), shape=(height, width))
    bilateral = create_pairwise_bilateral(sdims=(params.bilateral_sxy, params.bilateral_sxy),
                                          schan=(params.bilateral_srgb,) * 3, img=image, chdim=2)

    def batch(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(0)

    try:
        q = dense_crf_features(batch(unary), [batch(gaussian), batch(bilateral)],
                               [params.gaussian_compat, params.bilateral_compat],
                               [NORMALIZE_SYMMETRIC, NORMALIZE_SYMMETRIC], iterations=params.iterations)
    except (ValueError, RuntimeError) as exc:  # what the checks above cannot foresee
        raise ValueError(f"the dense CRF failed on {image_name}: {str(exc).splitlines()[0]} (options "
                         "--gaussian-sxy, --bilateral-sxy, --bilateral-srgb)") from None
    best = q[0].argmax(dim=0).numpy()
    crf_seconds = time.perf_counter() - start

    if values:
        result = codes.astype(np.uint16)[best].reshape(height, width)
    else:
        palette = np.stack([codes & 0xFF, (codes >> 8) & 0xFF, (codes >> 16) & 0xFF], axis=1).astype(np.uint8)
        result = palette[best].reshape(height, width, 3)
    unknown = (labels == 0).reshape(height, width) if has_unknown else np.zeros((height, width), dtype=bool)
    return RefineResult(result, unknown, n_labels, has_unknown, crf_seconds)


def _boundaries(rgb: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose colour differs from their right or lower neighbour."""
    edge = np.zeros(rgb.shape[:2], dtype=bool)
    edge[:, :-1] |= (rgb[:, :-1] != rgb[:, 1:]).any(axis=-1)
    edge[:-1, :] |= (rgb[:-1, :] != rgb[1:, :]).any(axis=-1)
    return edge


def _values_to_colours(anno: np.ndarray, result: np.ndarray):
    """16-bit value maps as VOC colours, the i-th smallest nonzero value in the i-th colour (0 is black)."""
    from ..data.voc import voc_palette

    codes = np.unique(np.concatenate([anno.reshape(-1), result.reshape(-1)]))
    palette = voc_palette()
    index = {int(c): i for i, c in enumerate(codes[codes != 0], start=1)}

    def colour(a):
        idx = np.zeros(a.shape, dtype=np.int64)
        for c, i in index.items():
            idx[a == c] = i
        return palette[idx % 256]

    return colour(anno), colour(result)


def make_overlay(image: np.ndarray, anno: np.ndarray, unknown: np.ndarray, result: np.ndarray,
                 alpha: float = 0.5) -> np.ndarray:
    """Side by side: the photo | the annotation over the photo | the result over the photo.

    Label colours are blended over the photo with weight ``alpha`` and the region borders drawn in white,
    so the refinement shows even with dark, similar label colours; unknown annotation pixels show the
    photo. Panels are separated by 4 white columns. 16-bit value annotations are shown in VOC colours.
    """
    if anno.ndim == 2:
        anno, result = _values_to_colours(anno, result)
    photo = image.astype(np.float32)

    def panel(colours: np.ndarray, keep_photo: np.ndarray | None = None) -> np.ndarray:
        out = np.clip(np.rint(photo * (1.0 - alpha) + colours.astype(np.float32) * alpha), 0, 255)
        out = out.astype(np.uint8)
        if keep_photo is not None:
            out[keep_photo] = image[keep_photo]
        out[_boundaries(colours)] = 255
        return out

    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([image, gap, panel(anno, unknown), gap, panel(result)], axis=1))
