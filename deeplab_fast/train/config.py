"""``TrainConfig``: everything a training run needs, as one dataclass (``deeplab-fast train`` builds one from its
options, ``deeplab_fast.train.train(config)`` runs it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from .crf_rnn import CRFasRNNStage

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """A training run of a registered DeepLab model on ``VOCSegmentation(data_root, "train", augmented)``.

    Model: ``model`` (a ``deeplab_fast.models.list_models()`` name), ``num_classes``, ``model_kwargs`` (passed to
    ``get_model``, e.g. ``{"width_divisor": 8}``, ``{"msc": True}``, ``{"output_stride": 16, "aux_loss":
    True}``), ``init`` (pretrained weights loaded before training where name and shape match: a registered
    weights name of the model, a path, a URL or a state dict; ignored when resuming), ``sync_bn`` (SyncBatchNorm
    under DDP).

    Optimisation: SGD with ``momentum`` and ``weight_decay``, base ``lr`` (the classifier at ``head_lr_mult`` x),
    the poly schedule over ``steps`` with ``power``; ``batch_size`` per process; ``amp``: float16 autocast with
    a GradScaler on CUDA, bfloat16 autocast on the CPU.

    Data: ``crop_size``, ``scale_range``, ``flip`` (``shuffle=False, scale_range=(1, 1), flip=False`` make a run
    deterministic), ``preprocessing`` (the input normalisation, "caffe" or "torchvision"; None: that of the
    ``init`` weights when they are registered, else the model's default), ``workers``, ``ignore_index``.

    Run: ``out_dir`` (``last.pth`` and ``log.jsonl``), ``resume`` (a ``last.pth`` to continue), ``stop_at`` (stop
    after that step with a checkpoint, as if interrupted), ``log_every``, ``ckpt_every``, ``val_every``,
    ``seed``, ``device``, ``progress``.

    Extra head (for stages that train a head on top of the network, e.g. a CRF-as-RNN layer): ``extra_head`` is
    a module factory ``f(model) -> nn.Module`` whose module is called as ``head(output, image)`` on the network's
    training output and the (normalised) input batch, and returns an output of the same form for the loss; its
    parameters form their own group at ``extra_head_lr`` (default ``lr``; 0 keeps them fixed), without weight
    decay unless ``extra_head_weight_decay`` is given. It is saved in the checkpoint as ``"extra_head"``.
    The CRF-as-RNN stage is ``extra_head=CRFasRNNStage(preset, compat=...)``
    (:mod:`deeplab_fast.train.crf_rnn`): the engine gives it the run's ``preprocessing`` to undo, and the
    checkpoint's ``"args"`` record it as ``"crf_rnn"`` (``eval`` rebuilds the trained CRF from them).
    """

    model: str
    data_root: str
    out_dir: str
    steps: int
    batch_size: int
    lr: float
    crop_size: int
    num_classes: int = 21
    preprocessing: Optional[str] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    amp: bool = False
    device: Any = "auto"
    resume: Optional[str] = None
    init: Any = None
    log_every: int = 10
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    val_every: int = 0
    workers: int = 0
    progress: bool = True
    ckpt_every: int = 1000
    shuffle: bool = True
    scale_range: Tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    augmented: bool = False
    ignore_index: int = 255
    head_lr_mult: float = 10.0
    stop_at: Optional[int] = None
    sync_bn: bool = False
    extra_head: Optional[Callable[[nn.Module], nn.Module]] = None
    extra_head_lr: Optional[float] = None
    extra_head_weight_decay: float = 0.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train: steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        self.model_kwargs = dict(self.model_kwargs or {})
        self.scale_range = tuple(self.scale_range)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def checkpoint_args(self, world_size: int) -> dict:
        """What the checkpoint's ``"args"`` records (``eval`` reads the model, its options, the class count and
        the preprocessing from it)."""
        return dict(model=self.model, data_root=str(self.data_root), num_classes=self.num_classes,
                    steps=self.steps, batch_size=self.batch_size, world_size=world_size, lr=self.lr,
                    crop_size=self.crop_size, preprocessing=self.preprocessing, momentum=self.momentum,
                    weight_decay=self.weight_decay, power=self.power, amp=bool(self.amp), seed=self.seed,
                    model_kwargs=self.model_kwargs, shuffle=self.shuffle, scale_range=list(self.scale_range),
                    flip=self.flip, augmented=self.augmented, head_lr_mult=self.head_lr_mult,
                    crf_rnn=self._crf_rnn_args(), extra_head_lr=self.extra_head_lr)

    def _crf_rnn_args(self) -> Optional[dict]:
        if not isinstance(self.extra_head, CRFasRNNStage):
            return None
        stage = self.extra_head  # train() has resolved self.preprocessing by now; the engine gives it to the stage
        if stage.preprocessing is None:
            stage = stage.replace(preprocessing=self.preprocessing)
        return stage.to_dict()
