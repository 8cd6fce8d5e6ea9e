"""Training and evaluation as in the DeepLab papers: losses, the poly learning rate, parameter groups, metrics.

- ``losses``: ``downsampled_cross_entropy`` (DeepLab v1 / v2: the label map nearest-downsampled to the score
  map), ``upsampled_cross_entropy`` (v3 / torchvision: the scores bilinearly upsampled to the labels),
  ``msc_loss`` (DeepLab v2 multi-scale training: one loss per scale plus the max-fused scores).
- ``lr``: ``poly_lr`` (torch's ``PolynomialLR``, power 0.9) and ``param_groups`` (10x learning rate for the
  classifier, no weight decay on biases).
- ``metrics``: ``ConfusionMatrix`` (exact int64 counts; mean IoU, pixel and mean class accuracy;
  ``all_reduce`` across processes).
"""
from .losses import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy
from .lr import HEAD_ATTRIBUTES, param_groups, poly_lr
from .metrics import ConfusionMatrix

# --- training engine (deeplab_fast/train/engine.py): its imports go here, e.g. `from .engine import ...`,
# --- and its names into __all__ below.

__all__ = [
    "downsampled_cross_entropy", "upsampled_cross_entropy", "msc_loss",
    "poly_lr", "param_groups", "HEAD_ATTRIBUTES",
    "ConfusionMatrix",
]

# Training engine (deeplab_fast/train/engine.py): the loops of ``deeplab-fast train`` / ``deeplab-fast eval``.
from .engine import default_mode, evaluate, init_weights, model_family, train  # noqa: E402

__all__ += ["train", "evaluate", "init_weights", "default_mode", "model_family"]
