"""Training and evaluation as in the DeepLab papers: losses, the poly learning rate, parameter groups, metrics, the
training configuration, the paper recipes, checkpoints, evaluation and the training loop.

- ``losses``: ``downsampled_cross_entropy`` (DeepLab v1 / v2: the label map nearest-downsampled to the score
  map), ``upsampled_cross_entropy`` (v3 / torchvision: the scores bilinearly upsampled to the labels),
  ``msc_loss`` (DeepLab v2 multi-scale training: one loss per scale plus the max-fused scores).
- ``families``: ``FAMILIES``, one ``Family`` per kind of DeepLab (v1, v2, v3, v3plus, mobile): its training
  forward and loss (``compute_loss``), train mode (v2's frozen BN), head modules, command-line options, recipes.
- ``lr``: ``poly_lr`` (torch's ``PolynomialLR``, power 0.9) and ``param_groups`` (10x learning rate for the
  classifier, no weight decay on biases).
- ``metrics``: ``ConfusionMatrix`` (exact int64 counts; mean IoU, pixel and mean class accuracy;
  ``all_reduce`` across processes).
- ``config``: ``TrainConfig``, a run's settings; ``recipes``: ``RECIPES``, the families' recipes, and
  ``training_settings`` (a run's settings from a recipe, the model family's defaults or an ``init`` checkpoint).
- ``crf_rnn``: the CRF-as-RNN stage: ``CRFasRNNStage`` (``TrainConfig(extra_head=CRFasRNNStage(...))``), the
  ``CRFasRNNHead`` it builds (a trainable ``DenseCRF`` on the network's scores) and ``denormalize``.
- ``checkpoint``: writing and reading ``deeplab-fast train`` checkpoints, ``load_trained_crf`` (the CRF a
  CRF-as-RNN run trained).
- ``pretrained``: ``init_weights`` (weights to start from, by name and shape) and ``resolve_preprocessing``.
- ``distributed``: the torchrun process group and each process's device.
- ``evaluate``: ``evaluate(model, loader, ...)`` (mIoU with scales, flips and the CRF) and ``evaluation_loader``.
- ``state``: ``TrainState`` and ``build_training`` (a run built or restored from a checkpoint).
- ``sampling``: each epoch's data, with augmentation draws seeded per sample (exact resume with any number of
  DataLoader workers).
- ``signals``: SIGTERM / SIGINT stop a run at a step boundary with a checkpoint (``TrainingInterrupted``).
- ``outputs``: ``last.pth`` only ever finite (``DivergenceError``), ``best.pth``, the log cut back on resume,
  stale temporary files removed.
- ``engine``: ``train(config)`` and ``train_one_epoch``: the loop.
"""
from .checkpoint import (CHECKPOINT_KEYS, load_trained_crf, load_training_checkpoint, read_training_checkpoint,
                         save_checkpoint, upgrade_args)
from .config import TrainConfig
from .crf_rnn import CRFasRNNHead, CRFasRNNStage, denormalize
from .engine import train, train_one_epoch
from .evaluate import evaluate, evaluation_loader
from .families import FAMILIES, Family, compute_loss, family
from .losses import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy
from .lr import HEAD_ATTRIBUTES, param_groups, poly_lr
from .metrics import ConfusionMatrix
from .outputs import DivergenceError
from .pretrained import init_weights, resolve_preprocessing
from .recipes import RECIPES, Recipe, recipe_for_family, recipe_for_model, recipes_table, training_settings
from .sampling import sample_seed
from .signals import TrainingInterrupted
from .state import TrainState, build_training

__all__ = [
    "downsampled_cross_entropy", "upsampled_cross_entropy", "msc_loss", "compute_loss",
    "poly_lr", "param_groups", "HEAD_ATTRIBUTES",
    "ConfusionMatrix",
    "FAMILIES", "Family", "family",
    "TrainConfig", "RECIPES", "Recipe", "recipe_for_family", "recipe_for_model", "recipes_table", "training_settings",
    "CRFasRNNStage", "CRFasRNNHead", "denormalize",
    "CHECKPOINT_KEYS", "save_checkpoint", "read_training_checkpoint", "load_training_checkpoint", "upgrade_args",
    "load_trained_crf", "init_weights", "resolve_preprocessing",
    "evaluate", "evaluation_loader", "train", "train_one_epoch", "build_training", "TrainState",
    "TrainingInterrupted", "DivergenceError", "sample_seed",
]
