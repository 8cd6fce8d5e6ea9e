"""Training and evaluation as in the DeepLab papers: losses, the poly learning rate, parameter groups, metrics, the
training configuration, the paper recipes and the loops.

- ``losses``: ``downsampled_cross_entropy`` (DeepLab v1 / v2: the label map nearest-downsampled to the score
  map), ``upsampled_cross_entropy`` (v3 / torchvision: the scores bilinearly upsampled to the labels),
  ``msc_loss`` (DeepLab v2 multi-scale training: one loss per scale plus the max-fused scores).
- ``lr``: ``poly_lr`` (torch's ``PolynomialLR``, power 0.9) and ``param_groups`` (10x learning rate for the
  classifier, no weight decay on biases).
- ``metrics``: ``ConfusionMatrix`` (exact int64 counts; mean IoU, pixel and mean class accuracy;
  ``all_reduce`` across processes).
- ``config``: ``TrainConfig``, a run's settings; ``recipes``: ``RECIPES``, the papers' recipes as data.
- ``crf_rnn``: the CRF-as-RNN stage: ``CRFasRNNStage`` (``TrainConfig(extra_head=CRFasRNNStage(...))``), the
  ``CRFasRNNHead`` it builds (a trainable ``DenseCRF`` on the network's scores) and ``denormalize``.
- ``engine``: ``train(config)``, ``train_one_epoch``, ``evaluate``, ``build_training``, the checkpoint functions
  (``load_trained_crf``: the CRF a CRF-as-RNN run trained)
  and ``init_weights``.
"""
from .config import TrainConfig
from .crf_rnn import CRFasRNNHead, CRFasRNNStage, denormalize
from .engine import (CHECKPOINT_KEYS, TrainState, build_training, compute_loss, default_preprocessing, evaluate,
                     init_weights, load_trained_crf, load_training_checkpoint, model_family, read_training_checkpoint,
                     resolve_preprocessing, save_checkpoint, train, train_one_epoch, upgrade_args)
from .losses import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy
from .lr import HEAD_ATTRIBUTES, param_groups, poly_lr
from .metrics import ConfusionMatrix
from .recipes import RECIPES, Recipe, recipe_for_family, recipes_table

__all__ = [
    "downsampled_cross_entropy", "upsampled_cross_entropy", "msc_loss",
    "poly_lr", "param_groups", "HEAD_ATTRIBUTES",
    "ConfusionMatrix",
    "TrainConfig", "RECIPES", "Recipe", "recipe_for_family", "recipes_table",
    "CRFasRNNStage", "CRFasRNNHead", "denormalize", "load_trained_crf",
    "train", "train_one_epoch", "evaluate", "build_training", "TrainState", "compute_loss", "save_checkpoint",
    "load_training_checkpoint", "read_training_checkpoint", "CHECKPOINT_KEYS", "init_weights", "resolve_preprocessing",
    "default_preprocessing", "model_family", "upgrade_args",
]
