"""The training and evaluation loops of the DeepLab models (``deeplab-fast train`` / ``deeplab-fast eval``), as small
functions in the manner of torchvision's ``references/segmentation/train.py``.

``train(config)`` runs a :class:`~deeplab_fast.train.TrainConfig`: :func:`build_training` (the model, ``init``
weights, SGD with the head at 10x the base learning rate through :func:`deeplab_fast.train.param_groups`, the poly
schedule :func:`deeplab_fast.train.poly_lr` stepped every iteration, resuming from a checkpoint), then
:func:`train_one_epoch` per pass over ``VOCSegmentation(data_root, "train")`` with
:class:`~deeplab_fast.data.transforms.TrainTransform` crops, with checkpoints (:func:`save_checkpoint`) and
validation (:func:`evaluate`) between steps. The loss follows the model's family (its registration,
``deeplab_fast.models.model_entry(name).family``):

* v1 and v2: cross-entropy on the 1/8-resolution scores (``forward_logits``) against labels downsampled to that
  grid (``downsampled_cross_entropy``, the Caffe recipe); v2 with ``msc=True``: ``msc_loss`` over the per-scale
  and max-fused scores (kazuto1011's recipe). v2 trains with frozen BatchNorm statistics
  (``DeepLabV2.freeze_bn``), as the paper and kazuto1011.
* v3: cross-entropy on the logits upsampled to the crop (``upsampled_cross_entropy``), plus 0.4 x the auxiliary
  head's loss with ``aux_loss=True`` (torchvision's reference recipe).

The CRF-as-RNN stage (``TrainConfig(extra_head=CRFasRNNStage(...))``, ``train --crf-rnn``) puts a trainable
:class:`deeplab_fast.nn.DenseCRF` on those scores (:class:`~deeplab_fast.train.crf_rnn.CRFasRNNHead`: the input's
normalisation undone for the CRF's uint8 image, ``log(Q + eps)`` at the crop size in place of the final scores),
so the same family loss becomes the CRF marginals' negative log-likelihood at full resolution and the network
trains through the CRF; the CRF's compatibilities are their own parameter group. Validation then also reports
the mIoU after the CRF being trained.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA, gloo on the CPU), the
model is wrapped in ``DistributedDataParallel`` and the data split by ``DistributedSampler``; ``batch_size``
is per process (torchvision's convention), so the effective batch is ``batch_size x WORLD_SIZE``. Only rank 0
writes the checkpoint and the log and shows the progress bar.

Checkpoint ``out_dir/last.pth``: a dict ``{"model", "optimizer", "scheduler", "scaler", "step", "args",
"rng"}`` (``model`` is the plain model's state dict, so ``models.load_checkpoint`` and ``deeplab-fast
segment/eval --weights`` read it; a run with an extra head adds ``"extra_head"``, and :func:`load_trained_crf`
rebuilds a CRF-as-RNN run's CRF from it and ``args["crf_rnn"]``), written atomically every ``ckpt_every`` steps
and at the end.
``resume=path`` restores all of it and continues from the saved step (up to ``steps``; a larger ``steps`` than
the checkpoint's extends the poly schedule, recomputed in closed form at the saved step) with the same data
order, augmentation and dropout draws as an uninterrupted run.
Log ``out_dir/log.jsonl``: one JSON object per ``log_every`` steps: ``step``, ``loss`` (averaged over the
processes), ``lr`` (base group), ``time`` (seconds since the start of this run), and ``val`` lines from
``val_every``.

``evaluate(...)`` computes mIoU, pixel accuracy and per-class IoU on a split, from the softmax probabilities at
full resolution averaged over ``scales`` (and horizontal flips), and optionally again after the dense CRF
(:class:`deeplab_fast.nn.DenseCRF`, a preset name) applied to those averaged probabilities with the uint8 image.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .crf_rnn import CRFasRNNHead, CRFasRNNStage

__all__ = ["train", "train_one_epoch", "evaluate", "build_training", "TrainState", "compute_loss",
           "save_checkpoint", "load_training_checkpoint", "read_training_checkpoint", "load_trained_crf",
           "init_weights", "resolve_preprocessing", "default_preprocessing", "model_family", "CHECKPOINT_KEYS",
           "upgrade_args"]

# What a training checkpoint holds ("scaler" and "rng" may be empty).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "args", "rng")


def model_family(model_name: str) -> str:
    """"v1", "v2" or "v3": the family a registered model belongs to (its registration says); ValueError for an
    unknown name."""
    from ..models import model_entry

    return model_entry(model_name).family


def default_preprocessing(model_name: str) -> str:
    """The input normalisation a registered model's weights expect when they do not say: "caffe" (BGR, 0-255,
    mean subtracted) for v1/v2, "torchvision" (RGB in [0, 1], ImageNet mean/std) for v3."""
    from ..models import model_entry

    return model_entry(model_name).default_preprocessing


def resolve_preprocessing(model_name: str, preprocessing: Optional[str] = None, init=None) -> str:
    """``preprocessing`` if given; else that of the ``init`` weights (a ``deeplab-fast train`` checkpoint says
    which it was trained with; registered weights, or a file named as one, say theirs); else the model's
    default."""
    if preprocessing is not None:
        return preprocessing
    if isinstance(init, (str, os.PathLike)) and os.path.isfile(init):
        try:
            saved = read_training_checkpoint(init)
        except (ValueError, OSError):
            saved = None
        if saved is not None and saved["args"].get("preprocessing") is not None:
            return saved["args"]["preprocessing"]
    if init is not None and not isinstance(init, dict):
        from ..models import resolve_weights

        try:
            return resolve_weights(model_name, init).meta["normalization"]["preprocessing"]
        except (ValueError, OSError, KeyError, TypeError):
            pass
    return default_preprocessing(model_name)


# ---------------------------------------------------------------------------------------------------------
# distributed helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _init_distributed(device: str):
    """Initialises the process group under torchrun (WORLD_SIZE > 1). Returns (rank, world, local_rank, created)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _resolve_device(device, local_rank: int = 0) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank if _dist() is not None else torch.cuda.current_device())
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------
# the model in training


class _TrainForward(nn.Module):
    """What the loss needs from the model, as ``forward`` (so that DistributedDataParallel sees it):
    v1/v2 the 1/8 scores (``forward_logits``), v2 MSC the per-scale list (``msc_logits``), v3 ``forward``; then
    the extra head, if any, as ``head(output, image)``."""

    def __init__(self, model: nn.Module, family: str, extra_head: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.family = family
        self.extra_head = extra_head

    def forward(self, x):
        m = self.model
        if self.family == "v3":
            out = m(x)
        elif self.family == "v2" and getattr(m, "msc", False) is True:
            out = m.msc_logits(x)
        else:
            out = m.forward_logits(x)
        return out if self.extra_head is None else self.extra_head(out, x)


def compute_loss(family: str, out, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The training loss of a model family on its training output (see the module docstring)."""
    from .losses import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy

    if family == "v3":
        if isinstance(out, dict):
            loss = upsampled_cross_entropy(out["out"], target, ignore_index=ignore_index)
            if out.get("aux") is not None:
                loss = loss + 0.4 * upsampled_cross_entropy(out["aux"], target, ignore_index=ignore_index)
            return loss
        return upsampled_cross_entropy(out, target, ignore_index=ignore_index)
    if isinstance(out, (list, tuple)):  # v2 MSC: [scale 1, smaller scales..., max]
        return msc_loss(list(out[:-1]), out[-1], target, ignore_index=ignore_index, downsample=True)
    return downsampled_cross_entropy(out, target, ignore_index=ignore_index)


def _set_train_mode(model: nn.Module, family: str) -> None:
    model.train()
    if family == "v2" and hasattr(model, "freeze_bn"):
        model.freeze_bn()


def init_weights(model: nn.Module, init, model_name: Optional[str] = None) -> tuple:
    """Loads pretrained weights into ``model`` before training, as the paper recipes start: every tensor whose
    name and shape match the model's is copied, the rest (e.g. a classifier for other classes) keeps its
    initialisation.

    ``init``: a registered weights name of the model (``get_model_weights(model_name)``: e.g.
    ``"IMAGENET1K_BACKBONE"``, ``"COCO_WITH_VOC_LABELS_V1"``), a ``WeightsEnum`` member, a path or URL (a file
    named as a registered weights file gets that entry's key map, e.g. ``vgg16-397923af.pth`` into v1's
    ``features``), or a state dict in the model's key names. ``model_name`` defaults to ``model.arch``.
    Returns (tensors loaded, tensors in the model); ValueError when nothing matches.
    """
    from .. import models

    if isinstance(init, (str, os.PathLike, models.WeightsEnum, models.Weights)):
        name = model_name or getattr(model, "arch", None)
        if name is None:
            raise ValueError("init_weights: give model_name (the model has no 'arch')")
        state = models.load_weights_state_dict(models.resolve_weights(name, init))
    else:
        state = dict(init)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ValueError("init: no tensor of the checkpoint matches the model by name and shape")
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state: "TrainState", args: dict) -> None:
    """Writes the training checkpoint (``CHECKPOINT_KEYS``, plus ``"extra_head"`` when there is one) atomically."""
    from ..io import save_checkpoint as atomic_save

    ckpt = dict(model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
                scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict(), step=state.step,
                args=args, rng=torch.get_rng_state())
    if state.extra_head is not None:
        ckpt["extra_head"] = state.extra_head.state_dict()
    atomic_save(ckpt, path)


def read_training_checkpoint(path) -> Optional[dict]:
    """The ``deeplab-fast train`` checkpoint in ``path`` (a dict with a ``"model"`` state dict and ``"args"``),
    or None when the file is readable but another kind of checkpoint. ValueError naming the file when
    ``torch.load(weights_only=True)`` cannot read it; FileNotFoundError when it is missing."""
    from ..models import load_checkpoint

    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: '{path}'") from None
    except Exception:  # noqa: BLE001 - load_checkpoint words the error
        load_checkpoint(path)  # raises its ValueError (or FileNotFoundError / a directory's ValueError)
        raise ValueError(f"cannot read '{path}'") from None  # not reached: load_checkpoint raised
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("args"), dict):
        obj["args"] = upgrade_args(obj["args"])
        return obj
    return None


def upgrade_args(args: dict) -> dict:
    """A checkpoint's ``"args"`` in today's names: checkpoints written before the input preprocessing was called
    so stored it as ``"mode"`` (in ``"crf_rnn"`` too)."""
    args = dict(args)
    if "mode" in args:
        args.setdefault("preprocessing", args["mode"])
        del args["mode"]
    stage = args.get("crf_rnn")
    if isinstance(stage, dict) and "mode" in stage:
        stage = dict(stage)
        stage.setdefault("preprocessing", stage.pop("mode"))
        args["crf_rnn"] = stage
    return args


def load_training_checkpoint(path) -> dict:
    """The ``deeplab-fast train`` checkpoint in ``path``, checked for every key ``resume`` needs; ValueError
    naming the file and what was expected otherwise."""
    from ..models import CheckpointError

    ckpt = read_training_checkpoint(path)
    expected = ", ".join(CHECKPOINT_KEYS[:-2])
    if ckpt is None:
        raise CheckpointError(f"'{os.fspath(path)}' is not a 'deeplab-fast train' checkpoint (expected a dict with "
                         f"{expected}, as OUT/last.pth holds); a plain state dict can start a run with --init")
    missing = [k for k in ("optimizer", "scheduler", "step") if k not in ckpt]
    bad_step = "step" in ckpt and not (isinstance(ckpt["step"], int) and ckpt["step"] >= 0)
    if missing or bad_step or not isinstance(ckpt.get("optimizer"), dict):
        what = f"it lacks {', '.join(missing)}" if missing else "its step or optimizer entry is malformed"
        raise CheckpointError(f"'{os.fspath(path)}' is not a complete 'deeplab-fast train' checkpoint ({what}; "
                         f"expected {expected})")
    return ckpt


def load_trained_crf(checkpoint, iterations: Optional[int] = None) -> nn.Module:
    """The CRF a CRF-as-RNN run trained, from its ``deeplab-fast train`` checkpoint (a path or the loaded dict):
    a :class:`deeplab_fast.nn.DenseCRF` with the learned compatibilities (still ``trainable``; under ``no_grad``
    it runs as the plain layer), with the run's iterations or ``iterations``. ValueError when the checkpoint
    holds no trained CRF."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_training_checkpoint(checkpoint)
    where = "the checkpoint" if isinstance(checkpoint, dict) else f"'{os.fspath(checkpoint)}'"
    spec = upgrade_args((ckpt or {}).get("args") or {}).get("crf_rnn")
    state = (ckpt or {}).get("extra_head")
    if not isinstance(spec, dict) or not isinstance(state, dict):
        raise ValueError(f"{where} holds no trained CRF (it was not written by a 'deeplab-fast train --crf-rnn' "
                         "run)")
    known = {f.name for f in fields(CRFasRNNStage)}
    stage = CRFasRNNStage(**{k: v for k, v in spec.items() if k in known})
    if iterations is not None:
        stage = stage.replace(iterations=iterations)
    crf = stage.build_crf(int(ckpt["args"]["num_classes"]))
    prefix = "crf."
    try:
        crf.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as exc:
        raise ValueError(f"{where}: its CRF does not fit {stage}: {str(exc).splitlines()[0]}") from None
    return crf


# ---------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainState:
    """What changes during a run: the model (and its DDP / training-forward wrapper ``net``), the optimizer,
    scheduler and scaler, the step count, the last logged loss."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    family: str
    device: torch.device
    step: int = 0
    extra_head: Optional[nn.Module] = None
    last_loss: float = float("nan")


def build_training(cfg: TrainConfig, rank: int = 0, world: int = 1, device: Optional[torch.device] = None,
                   verbose: bool = True, checkpoint: Optional[dict] = None) -> TrainState:
    """The model (seeded by ``cfg.seed``, ``init`` loaded), optimizer, scheduler and scaler of a run, restored
    from ``cfg.resume`` (or the already loaded ``checkpoint``) when given, with the RNG state, so the run
    continues as if uninterrupted."""
    from torch.nn.parallel import DistributedDataParallel

    from .. import models
    from .lr import param_groups, poly_lr

    dev = device if device is not None else _resolve_device(cfg.device)
    family = model_family(cfg.model)
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
    groups = param_groups(model, cfg.lr, weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult)
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

    net = _TrainForward(model, family, extra_head)
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    return TrainState(model=model, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, family=family,
                      device=dev, step=step, extra_head=extra_head)


def train_one_epoch(state: TrainState, loader, cfg: TrainConfig, *, end: int,
                    log: Optional[Callable[[dict], None]] = None, t0: Optional[float] = None, bar=None,
                    after_step: Optional[Callable[[TrainState], None]] = None) -> None:
    """One pass over ``loader`` (or up to step ``end``): forward (autocast with ``cfg.amp``), loss, backward,
    optimizer and scheduler steps. Every ``cfg.log_every`` steps (and at ``end``) the loss, averaged over the
    processes, goes to ``log`` as ``{"step", "loss", "lr", "time"}``; ``after_step(state)`` runs after each
    step (checkpoints, validation). FloatingPointError when the loss is not finite."""
    dev = state.device
    autocast_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    t0 = time.perf_counter() if t0 is None else t0
    for image, target in loader:
        image = image.to(dev, non_blocking=True)
        target = target.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=autocast_dtype, enabled=bool(cfg.amp)):
            out = state.net(image)
        loss = compute_loss(state.family, _to_float(out), target, cfg.ignore_index)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        lr_now = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()
        state.step += 1
        if bar is not None:
            bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == end:
            value = loss.detach().float()
            d = _dist()
            if d is not None:
                d.all_reduce(value)
                value /= d.get_world_size()
            state.last_loss = float(value)
            if not math.isfinite(state.last_loss):
                raise FloatingPointError(f"train: the loss is {state.last_loss} at step {state.step}; lower --lr")
            if log is not None:
                log(dict(step=state.step, loss=state.last_loss, lr=lr_now, time=round(time.perf_counter() - t0, 3)))
            if bar is not None:
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr_now:.2e}")
        if after_step is not None:
            after_step(state)
        if state.step >= end:
            return


def _epoch_loader(dataset, sampler, cfg: TrainConfig, epoch: int, skip: int, rank: int, dev: torch.device):
    """The DataLoader of one epoch, resuming mid-epoch after ``skip`` batches."""
    from torch.utils.data import DataLoader

    sampler.set_epoch(epoch)
    indices = list(sampler)[skip * cfg.batch_size:]  # resume mid-epoch where the run stopped
    # Its own generator: the loader's per-iterator seed draw (worker seeds) must not consume the global RNG, or a
    # resumed run would draw different augmentations / dropout masks.
    loader_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + 1000003 * rank)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                      drop_last=True, pin_memory=dev.type == "cuda", generator=loader_gen)


def _config(config, data_root, out_dir, kwargs) -> TrainConfig:
    if isinstance(config, TrainConfig):
        if data_root is not None or out_dir is not None or kwargs:
            return config.replace(**{k: v for k, v in dict(kwargs, data_root=data_root, out_dir=out_dir).items()
                                     if v is not None})
        return config
    return TrainConfig(model=config, data_root=data_root, out_dir=out_dir, **kwargs)


def train(config, data_root=None, out_dir=None, **kwargs) -> dict:
    """Runs a training: ``train(TrainConfig(...))``, or ``train(model_name, data_root, out_dir, **fields)`` with
    the :class:`TrainConfig` fields as keywords. See the module docstring.

    Returns ``{"step", "loss" (last logged), "checkpoint", "log", "world_size", "seconds"}`` plus ``"val"``
    (the last :func:`evaluate` result) when ``val_every`` > 0. Every process returns; only rank 0 writes.
    """
    from torch.utils.data import DistributedSampler
    from tqdm import tqdm

    from ..data import VOCSegmentation
    from ..data.transforms import TrainTransform

    cfg = _config(config, data_root, out_dir, kwargs)
    ckpt = load_training_checkpoint(cfg.resume) if cfg.resume is not None else None
    if ckpt is not None:  # a resumed run keeps its preprocessing
        cfg = cfg.replace(preprocessing=cfg.preprocessing or ckpt["args"].get("preprocessing")
                          or resolve_preprocessing(cfg.model))
    else:
        cfg = cfg.replace(preprocessing=resolve_preprocessing(cfg.model, cfg.preprocessing, cfg.init))
    rank, world, local_rank, created_group = _init_distributed(str(cfg.device))
    try:
        dev = _resolve_device(cfg.device, local_rank)
        out = Path(cfg.out_dir)
        ckpt_path, log_path = out / "last.pth", out / "log.jsonl"
        args = cfg.checkpoint_args(world)
        state = build_training(cfg, rank, world, dev, checkpoint=ckpt)

        transform = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip,
                                   preprocessing=cfg.preprocessing, ignore_index=cfg.ignore_index)
        dataset = VOCSegmentation(cfg.data_root, split="train", augmented=cfg.augmented, transform=transform)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=cfg.shuffle, seed=cfg.seed,
                                     drop_last=True)
        steps_per_epoch = len(sampler) // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"train: {len(dataset)} training images are fewer than one batch of {cfg.batch_size} "
                             f"per process x {world} process(es)")

        is_main = rank == 0
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "a" if cfg.resume is not None else "w", encoding="utf-8")
        result_val = None
        t0 = time.perf_counter()
        end = cfg.steps if cfg.stop_at is None else min(cfg.steps, max(cfg.stop_at, state.step))
        bar = tqdm(total=cfg.steps, initial=state.step, unit="step", disable=not (cfg.progress and is_main),
                   dynamic_ncols=True)

        def log(entry):
            if is_main:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()

        def after_step(s: TrainState):
            nonlocal result_val
            if cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.step != end and is_main:
                save_checkpoint(ckpt_path, s, args)
            if cfg.val_every and s.step % cfg.val_every == 0:
                crf = s.extra_head.crf if isinstance(s.extra_head, CRFasRNNHead) else None  # the CRF being trained
                result_val = evaluate(s.model, cfg.data_root, split="val", num_classes=cfg.num_classes,
                                      preprocessing=cfg.preprocessing, device=dev, progress=False,
                                      ignore_index=cfg.ignore_index, crf=crf)
                log(dict(step=s.step, val=_brief(result_val)))
                _set_train_mode(s.model, s.family)

        _set_train_mode(state.model, state.family)
        try:
            while state.step < end:
                epoch, skip = divmod(state.step, steps_per_epoch)
                loader = _epoch_loader(dataset, sampler, cfg, epoch, skip, rank, dev)
                train_one_epoch(state, loader, cfg, end=end, log=log, t0=t0, bar=bar, after_step=after_step)
            if is_main:
                save_checkpoint(ckpt_path, state, args)
        finally:
            bar.close()
            if is_main:
                log_file.close()
        d = _dist()
        if d is not None:
            d.barrier()  # the checkpoint is complete before any process returns
        result = dict(step=state.step, loss=state.last_loss, checkpoint=str(ckpt_path), log=str(log_path),
                      world_size=world, seconds=time.perf_counter() - t0)
        if result_val is not None:
            result["val"] = result_val
        return result
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _to_float(out):
    if isinstance(out, dict):
        return {k: (v.float() if v is not None else None) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [v.float() for v in out]
    return out.float()


def _brief(metrics: dict) -> dict:
    brief = {k: metrics[k] for k in ("miou", "pixel_accuracy", "per_class_iou") if k in metrics}
    if metrics.get("crf"):
        brief["crf"] = _brief(metrics["crf"])
    return brief


# ---------------------------------------------------------------------------------------------------------
# evaluation


def _metrics(cm) -> dict:
    def num(v):
        return float(v.item() if isinstance(v, torch.Tensor) else v)

    per_class = cm.per_class_iou()
    per_class = per_class.tolist() if isinstance(per_class, torch.Tensor) else [num(v) for v in per_class]
    return dict(miou=num(cm.miou()), pixel_accuracy=num(cm.pixel_accuracy()), per_class_iou=per_class)


@torch.no_grad()
def evaluate(model: nn.Module, data_root, *, split: str = "val", num_classes: int, preprocessing: str, crf=None,
             scales: Sequence[float] = (1.0,), flip: bool = False, device="auto", progress: bool = True,
             ignore_index: int = 255, workers: int = 0) -> dict:
    """mIoU, pixel accuracy and per-class IoU of ``model`` on ``VOCSegmentation(data_root, split)``.

    Each image is normalised by ``EvalTransform(preprocessing)`` and run whole (batch 1) at every scale in
    ``scales``
    (bilinear resize, ``align_corners=False``), and mirrored too with ``flip``; the softmax probabilities,
    upsampled to the image size, are averaged. ``crf`` (a :data:`deeplab_fast.nn.PRESETS` name, or a
    ``DenseCRF``) refines those averaged probabilities (their log as logits) with the uint8 image, on the
    model's device (the CUDA op on the GPU). Under DDP the images are split by ``DistributedSampler`` (which
    pads the split to a multiple of the world size with repeats) and the confusion matrices all-reduced.

    Returns ``{"miou", "pixel_accuracy", "per_class_iou" (list, NaN for classes absent from both prediction
    and truth), "num_images", "crf": None or the same three metrics after the CRF, "crf_preset"}``. The model's
    training mode is restored afterwards.
    """
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from ..data import VOCSegmentation
    from ..data.transforms import EvalTransform
    from ..nn import DenseCRF
    from .metrics import ConfusionMatrix

    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"evaluate: scales must be positive numbers, got {scales}")
    dev = _resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    crf_layer = DenseCRF.from_preset(crf) if isinstance(crf, str) else crf
    dataset = VOCSegmentation(data_root, split=split, transform=None)
    transform = EvalTransform(preprocessing=preprocessing)
    d = _dist()
    sampler = DistributedSampler(dataset, shuffle=False) if d is not None else None
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=dev)
    cm_crf = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=dev) if crf_layer is not None else None

    was_training = model.training
    model.to(dev).eval()
    show = progress and (d is None or d.get_rank() == 0)
    count = 0
    try:
        for image_u8, target in tqdm(loader, unit="img", disable=not show, dynamic_ncols=True, desc=split):
            image_u8, target = image_u8[0], target[0]
            x, _ = transform(image_u8, target)
            x = x.unsqueeze(0).to(dev)
            target = target.to(dev)
            size = x.shape[-2:]
            probs = None
            n = 0
            for s in scales:
                xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                for mirrored in ((False, True) if flip else (False,)):
                    inp = xs.flip(-1) if mirrored else xs
                    out = model(inp)
                    logits = out["out"] if isinstance(out, dict) else out
                    logits = logits.float()
                    if mirrored:
                        logits = logits.flip(-1)
                    if logits.shape[-2:] != size:
                        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                    p = logits.softmax(dim=1)
                    probs = p if probs is None else probs + p
                    n += 1
            probs = probs / n
            cm.update(probs.argmax(dim=1)[0], target)
            if crf_layer is not None:
                refined = crf_layer(probs.clamp_min(1e-8).log(), image_u8.unsqueeze(0).to(dev))
                cm_crf.update(refined.argmax(dim=1)[0], target)
            count += 1
    finally:
        model.train(was_training)
    cm.all_reduce()
    result = _metrics(cm)
    result["num_images"] = count
    result["crf"] = None
    result["crf_preset"] = crf if isinstance(crf, str) else (None if crf is None else repr(crf))
    if cm_crf is not None:
        cm_crf.all_reduce()
        result["crf"] = _metrics(cm_crf)
    return result
