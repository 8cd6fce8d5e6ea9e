"""Functional custom ops. Each is a ``torch.ops.deeplab_fast`` op with a fake (meta) kernel, so it works
under ``torch.compile(fullgraph=True)``."""
from .atrous_conv import atrous_conv2d, atrous_conv2d_plan, tap_skipping
from .dense_crf import (
    NO_NORMALIZATION,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    dense_crf,
    dense_crf_features,
    dense_crf_pairwise_energy,
    empty_cache,
)
from .dense_crf_3d import dense_crf_3d, dense_crf_3d_memory

__all__ = [
    "atrous_conv2d",
    "atrous_conv2d_plan",
    "tap_skipping",
    "dense_crf",
    "dense_crf_features",
    "dense_crf_pairwise_energy",
    "dense_crf_3d",
    "dense_crf_3d_memory",
    "empty_cache",
    "NO_NORMALIZATION",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NORMALIZE_SYMMETRIC",
]
