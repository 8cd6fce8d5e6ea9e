"""deeplab_fast: custom-kernel performance library for DeepLab semantic segmentation.

Subpackages:
  deeplab_fast.ops       functional custom ops (torch.ops.deeplab_fast.*), e.g. ``dense_crf``, ``dense_crf_3d``
  deeplab_fast.nn        drop-in nn.Modules, e.g. ``DenseCRF``, ``DenseCRF3d``
  deeplab_fast.densecrf  a drop-in for pydensecrf's API (``import deeplab_fast.densecrf as dcrf``)
  deeplab_fast.simplecrf a drop-in for SimpleCRF's (``from deeplab_fast.simplecrf import denseCRF, denseCRF3D``)
  deeplab_fast.models    DeepLab v1 / v2 / v3 models and their backbones; list_models / get_model / get_model_weights
                         with weights by name, path or URL (torchvision's conventions)
  deeplab_fast.optimize  optimize(model): fused layers in place of conv + BN + ReLU chains and ASPP heads
  deeplab_fast.train     TrainConfig, train / train_one_epoch / evaluate, losses, poly LR, metrics, the paper recipes
  deeplab_fast.data      PASCAL VOC, the training transforms, synthetic VOC-layout data and MR-like volumes
  deeplab_fast.io        image and volume (NIfTI, .npy) reading and atomic file writes
  deeplab_fast.cli       the deeplab-fast command (only calls the library; the library never imports it)
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.deeplab_fast.*)
from . import _env

_env.check()  # the DEEPLAB_FAST_* switches: a bad value is a ValueError here, an unknown name a warning
from . import ops, nn
from . import models
from .optimize import optimize

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "optimize", "__version__"]
