"""deeplab_fast: custom-kernel performance library for DeepLab semantic segmentation.

Subpackages:
  deeplab_fast.ops       functional custom ops (torch.ops.deeplab_fast.*), e.g. ``dense_crf``
  deeplab_fast.nn        drop-in nn.Modules, e.g. ``DenseCRF``
  deeplab_fast.densecrf  a drop-in for pydensecrf's API (``import deeplab_fast.densecrf as dcrf``)
  deeplab_fast.models    DeepLab v1 / v2 / v3 models and their backbones, torchvision-compatible weights
  deeplab_fast.optimize  optimize(model): fused layers in place of conv + BN + ReLU chains and ASPP heads
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.deeplab_fast.*)
from . import ops, nn
from . import models
from .optimize import optimize

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "optimize", "__version__"]
