"""What a training run holds (:class:`TrainState`) and how it is built or restored from a checkpoint
(:func:`build_training`): the model and its family's training forward, SGD with the family's head modules at 10x
the base learning rate (:func:`deeplab_fast.train.param_groups`), the poly schedule
(:func:`deeplab_fast.train.poly_lr`), the scaler, the extra head of a CRF-as-RNN stage, the RNG state."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import models
from .checkpoint import load_training_checkpoint
from .config import TrainConfig
from .crf_rnn import CRFasRNNStage
from .distributed import resolve_device
from .families import Family, family as family_of
from .lr import param_groups, poly_lr
from .pretrained import init_weights, resolve_preprocessing

__all__ = ["TrainState", "build_training", "set_train_mode"]


@dataclass
class TrainState:
    """What changes during a run: the model (and its DDP / training-forward wrapper ``net``), the optimizer,
    scheduler and scaler, the step count, the last logged loss, the step of the last checkpoint written
    (``saved_step``) and the best validation mIoU so far (``best_miou``, -inf before any)."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    family: Family
    device: torch.device
    step: int = 0
    extra_head: Optional[nn.Module] = None
    last_loss: float = float("nan")
    saved_step: int = 0
    best_miou: float = float("-inf")


class TrainForward(nn.Module):
    """What the loss needs from the model (``Family.forward``: v1/v2 the 1/8 scores, v2 MSC the per-scale list, the
    others ``forward``), as ``forward`` (so that DistributedDataParallel sees it); then the extra head, if any, as
    ``head(output, image)``."""

    def __init__(self, model: nn.Module, family: Family, extra_head: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.family = family
        self.extra_head = extra_head

    def forward(self, x):
        out = self.family.forward(self.model, x)
        return out if self.extra_head is None else self.extra_head(out, x)


def set_train_mode(model: nn.Module, family) -> None:
    """The family's training mode (``Family.train_mode``; ``family``: a Family or its name): ``model.train()``,
    with v2's BatchNorm statistics frozen (``DeepLabV2.freeze_bn``), as the paper and kazuto1011 train it."""
    family_of(family).train_mode(model)


def build_training(cfg: TrainConfig, rank: int = 0, world: int = 1, device: Optional[torch.device] = None,
                   verbose: bool = True, checkpoint: Optional[dict] = None) -> TrainState:
    """The model (seeded by ``cfg.seed``, ``init`` loaded), optimizer, scheduler and scaler of a run, restored
    from ``cfg.resume`` (or the already loaded ``checkpoint``) when given, with the RNG state, so the run
    continues as if uninterrupted."""
    dev = device if device is not None else resolve_device(cfg.device)
    family = family_of(models.model_entry(cfg.model).family)
    ckpt = checkpoint
    if ckpt is None and cfg.resume is not None:
        ckpt = load_training_checkpoint(cfg.resume)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    model = models.get_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_kwargs)
    if cfg.init is not None and ckpt is None:
        loaded, total = init_weights(model, cfg.init, cfg.model)
        if rank == 0 and verbose:
            print(f"init: {loaded} of {total} tensors loaded from "
                  f"{cfg.init if isinstance(cfg.init, (str, Path)) else 'the given weights'}", flush=True)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dev)
    groups = param_groups(model, cfg.lr, weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult,
                          head=family.head_modules(model))
    extra_head = None
    if cfg.extra_head is not None:
        factory = cfg.extra_head
        if isinstance(factory, CRFasRNNStage) and factory.preprocessing is None:  # it undoes the run's preprocessing
            factory = factory.replace(
                preprocessing=cfg.preprocessing or resolve_preprocessing(cfg.model, None, cfg.init))
        extra_head = factory(model).to(dev)
        groups.append(dict(params=list(extra_head.parameters()),
                           lr=cfg.lr if cfg.extra_head_lr is None else cfg.extra_head_lr,
                           weight_decay=cfg.extra_head_weight_decay))
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=bool(cfg.amp) and dev.type == "cuda")

    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if extra_head is not None and "extra_head" in ckpt:
                extra_head.load_state_dict(ckpt["extra_head"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"resume: '{os.fspath(cfg.resume)}' does not fit this run ({cfg.model} "
                             f"{cfg.model_kwargs or ''}): {str(exc).splitlines()[0]}") from None
        step = int(ckpt["step"])
        saved_sched = ckpt.get("scheduler") or {}
        if saved_sched.get("total_iters") == cfg.steps:
            scheduler = poly_lr(optimizer, cfg.steps, power=cfg.power)
            scheduler.load_state_dict(saved_sched)
        else:  # another schedule length: the poly value at `step` of the new one, then recursive steps
            scheduler = poly_lr(optimizer, cfg.steps, power=cfg.power, start_step=step)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if world == 1 and isinstance(ckpt.get("rng"), torch.Tensor):
            torch.set_rng_state(ckpt["rng"])
        else:
            torch.manual_seed(cfg.seed + 1000 * rank + step)
    else:
        scheduler = poly_lr(optimizer, cfg.steps, power=cfg.power)
        torch.manual_seed(cfg.seed + 1000 * rank)  # augmentation / dropout: different on each process

    net = TrainForward(model, family, extra_head)
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    best = float(ckpt.get("best_miou", float("-inf"))) if ckpt is not None else float("-inf")
    return TrainState(model=model, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, family=family,
                      device=dev, step=step, extra_head=extra_head, saved_step=step, best_miou=best)
