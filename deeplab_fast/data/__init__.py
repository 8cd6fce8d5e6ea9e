"""Data for training and evaluating DeepLab: the PASCAL VOC 2012 segmentation set (and its SBD-augmented
"train_aug" layout), the DeepLab training augmentation, and a small synthetic VOC-layout set for tests and
smoke runs.

- ``VOCSegmentation(root, split, augmented, transform)``: (uint8 Tensor[3, H, W], int64 Tensor[H, W]) pairs.
- ``TrainTransform`` / ``EvalTransform`` (``deeplab_fast.data.transforms``): random scale, pad, crop, flip and
  normalisation (torchvision's ImageNet or the Caffe BGR mean).
- ``make_synthetic_voc(root, ...)``: writes coloured shapes on textured backgrounds in the VOC layout.
- ``synthetic_volume(shape, labels, channels)``: an MR-like volume with blobs and a noisy probability map (the
  volumetric dense CRF's tests and benchmarks).
"""
from .synthetic import make_synthetic_voc
from .synthetic_volume import SyntheticVolume, synthetic_volume
from .transforms import EvalTransform, TrainTransform, denormalize, normalize
from .voc import VOC_CLASSES, VOCSegmentation, colorize, find_voc_root, voc_palette

__all__ = ["VOCSegmentation", "VOC_CLASSES", "voc_palette", "colorize", "find_voc_root", "TrainTransform", "EvalTransform", "normalize", "denormalize", "make_synthetic_voc", "synthetic_volume", "SyntheticVolume"]
