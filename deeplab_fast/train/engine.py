"""The training loop of the DeepLab models (``deeplab-fast train``), as small functions in the manner of
torchvision's ``references/segmentation/train.py``.

``train(config)`` runs a :class:`~deeplab_fast.train.TrainConfig`: :func:`build_training` (the model, ``init``
weights, SGD with the head at 10x the base learning rate through :func:`deeplab_fast.train.param_groups`, the poly
schedule :func:`deeplab_fast.train.poly_lr` stepped every iteration, resuming from a checkpoint), then
:func:`train_one_epoch` per pass over ``VOCSegmentation(data_root, "train")`` with
:class:`~deeplab_fast.data.transforms.TrainTransform` crops, with checkpoints
(:func:`deeplab_fast.train.save_checkpoint`) and validation (:func:`deeplab_fast.train.evaluate`) between steps.
The training forward, the loss, the train mode (v2: frozen BatchNorm statistics, as the paper and kazuto1011) and the
head modules follow the model's family (:mod:`deeplab_fast.train.families`).

The CRF-as-RNN stage (``TrainConfig(extra_head=CRFasRNNStage(...))``, ``train --crf-rnn``) puts a trainable
:class:`deeplab_fast.nn.DenseCRF` on those scores (:class:`~deeplab_fast.train.crf_rnn.CRFasRNNHead`: the input's
preprocessing undone for the CRF's uint8 image, ``log(Q + eps)`` at the crop size in place of the final scores),
so the same family loss becomes the CRF marginals' negative log-likelihood at full resolution and the network
trains through the CRF; the CRF's compatibilities are their own parameter group. Validation then also reports
the mIoU after the CRF being trained.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA, gloo on the CPU), the
model is wrapped in ``DistributedDataParallel`` and the data split by ``DistributedSampler``; ``batch_size``
is per process (torchvision's convention), so the effective batch is ``batch_size x WORLD_SIZE``. Only rank 0
writes the checkpoint and the log and shows the progress bar.

Checkpoint ``out_dir/last.pth`` (:mod:`deeplab_fast.train.checkpoint`), written every ``ckpt_every`` steps, at the
end, and when SIGTERM or SIGINT stops the run (at the next step boundary: :mod:`deeplab_fast.train.signals`);
``out_dir/best.pth`` at each new best validation mIoU (``val_every``). Every step's loss and, before each save, the
parameters are checked finite: a diverged run stops with a one-line FloatingPointError naming the step and never
writes a non-finite checkpoint (:mod:`deeplab_fast.train.outputs`). ``resume=path`` restores all of it and
continues from the saved step (up to ``steps``; a larger ``steps`` than the checkpoint's extends the poly
schedule, recomputed in closed form at the saved step) with the same data order, augmentation draws (seeded per
sample: :mod:`deeplab_fast.train.sampling`, for any number of workers) and dropout draws as an uninterrupted run.
Log ``out_dir/log.jsonl``: one JSON object per ``log_every`` steps: ``step``, ``loss`` (averaged over the
processes), ``lr`` (base group), ``time`` (seconds since the start of this run), and ``val`` lines from
``val_every``; a resumed run first cuts it back to its step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ..data import VOCSegmentation
from ..data.transforms import TrainTransform
from .checkpoint import load_training_checkpoint, save_checkpoint
from .config import TrainConfig
from .crf_rnn import CRFasRNNHead
from .distributed import distributed, process_group, resolve_device
from .evaluate import evaluate, evaluation_loader
from .outputs import DivergenceError, check_finite, remove_stale_parts, truncate_log
from .pretrained import resolve_preprocessing
from .sampling import epoch_loader
from .signals import StopSignals, TrainingInterrupted
from .state import TrainState, build_training, set_train_mode

__all__ = ["train", "train_one_epoch"]


def _hint(state: TrainState, cfg: TrainConfig) -> str:
    """What to do about a diverged run: the one-line error's hint."""
    saved = (f"; the last checkpoint, of step {state.saved_step}, is finite: resume from it with a lower one"
             if state.saved_step else "")
    return f"lower the learning rate (lr {cfg.lr:g}){saved}"


def _on_any_process(flag: bool, device: torch.device) -> bool:
    """``flag`` of any process of a torchrun run (they stop together), or this one's."""
    group = process_group()
    if group is None:
        return flag
    value = torch.tensor(float(flag), device=device)
    group.all_reduce(value, op=group.ReduceOp.MAX)
    return bool(value.item())


def _to_float(out):
    if isinstance(out, dict):
        return {k: (v.float() if v is not None else None) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [v.float() for v in out]
    return out.float()


def train_one_epoch(state: TrainState, loader, cfg: TrainConfig, *, end: int,
                    log: Optional[Callable[[dict], None]] = None, t0: Optional[float] = None, bar=None,
                    after_step: Optional[Callable[[TrainState], None]] = None) -> None:
    """One pass over ``loader`` (or up to step ``end``): forward (autocast with ``cfg.amp``), loss, backward,
    optimizer and scheduler steps. Every ``cfg.log_every`` steps (and at ``end``) the loss, averaged over the
    processes, goes to ``log`` as ``{"step", "loss", "lr", "time"}``; ``after_step(state)`` runs after each
    step (checkpoints, validation, stop signals). DivergenceError (a FloatingPointError) when a loss is not finite,
    before the update."""
    dev = state.device
    autocast_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    t0 = time.perf_counter() if t0 is None else t0
    for image, target in loader:
        image = image.to(dev, non_blocking=True)
        target = target.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=autocast_dtype, enabled=bool(cfg.amp)):
            out = state.net(image)
        loss = state.family.loss(_to_float(out), target, cfg.ignore_index)
        if _on_any_process(not bool(torch.isfinite(loss.detach())), dev):
            raise DivergenceError(f"train: the loss is {float(loss.detach()):g} at step {state.step + 1}: the run "
                                  f"diverged; {_hint(state, cfg)}")
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
            group = process_group()
            if group is not None:
                group.all_reduce(value)
                value /= group.get_world_size()
            state.last_loss = float(value)
            if log is not None:
                log(dict(step=state.step, loss=state.last_loss, lr=lr_now, time=round(time.perf_counter() - t0, 3)))
            if bar is not None:
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr_now:.2e}")
        if after_step is not None:
            after_step(state)
        if state.step >= end:
            return


def _config(config, data_root, out_dir, kwargs) -> TrainConfig:
    if isinstance(config, TrainConfig):
        if data_root is not None or out_dir is not None or kwargs:
            return config.replace(**{k: v for k, v in dict(kwargs, data_root=data_root, out_dir=out_dir).items()
                                     if v is not None})
        return config
    return TrainConfig(model=config, data_root=data_root, out_dir=out_dir, **kwargs)


def _brief(metrics: dict) -> dict:
    brief = {k: metrics[k] for k in ("miou", "pixel_accuracy", "per_class_iou") if k in metrics}
    if metrics.get("crf"):
        brief["crf"] = _brief(metrics["crf"])
    return brief


def train(config, data_root=None, out_dir=None, **kwargs) -> dict:
    """Runs a training: ``train(TrainConfig(...))``, or ``train(model_name, data_root, out_dir, **fields)`` with
    the :class:`TrainConfig` fields as keywords. See the module docstring.

    Returns ``{"step", "loss" (last logged), "checkpoint", "log", "world_size", "seconds"}`` plus ``"val"``
    (the last :func:`evaluate` result) when ``val_every`` > 0. Every process returns; only rank 0 writes.
    Raises TrainingInterrupted (a KeyboardInterrupt) after writing the checkpoint when SIGTERM or SIGINT stopped
    the run, DivergenceError (a FloatingPointError) when it diverged.
    """
    cfg = _config(config, data_root, out_dir, kwargs)
    ckpt = load_training_checkpoint(cfg.resume) if cfg.resume is not None else None
    if ckpt is not None:  # a resumed run keeps its preprocessing
        cfg = cfg.replace(preprocessing=cfg.preprocessing or ckpt["args"].get("preprocessing")
                          or resolve_preprocessing(cfg.model))
    else:
        cfg = cfg.replace(preprocessing=resolve_preprocessing(cfg.model, cfg.preprocessing, cfg.init))
    with distributed(str(cfg.device)) as (rank, world, local_rank), StopSignals() as stop:
        return _run(cfg, ckpt, rank, world, resolve_device(cfg.device, local_rank), stop)


def _run(cfg: TrainConfig, ckpt: Optional[dict], rank: int, world: int, dev: torch.device,
         stop: StopSignals) -> dict:
    out = Path(cfg.out_dir)
    last_path, best_path, log_path = out / "last.pth", out / "best.pth", out / "log.jsonl"
    args = cfg.checkpoint_args(world)
    state = build_training(cfg, rank, world, dev, checkpoint=ckpt)
    transform = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip,
                               preprocessing=cfg.preprocessing, ignore_index=cfg.ignore_index)
    dataset = VOCSegmentation(cfg.data_root, split="train", augmented=cfg.augmented)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=cfg.shuffle, seed=cfg.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train: {len(dataset)} training images are fewer than one batch of {cfg.batch_size} "
                         f"per process x {world} process(es)")
    val_loader = evaluation_loader(VOCSegmentation(cfg.data_root, split="val")) if cfg.val_every else None

    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(out)  # left by a run killed while writing
        if ckpt is not None:
            truncate_log(log_path, state.step)  # the steps after the checkpoint are run again
        log_file = open(log_path, "a" if ckpt is not None else "w", encoding="utf-8")
    result_val = None
    t0 = time.perf_counter()
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, max(cfg.stop_at, state.step))
    bar = tqdm(total=cfg.steps, initial=state.step, unit="step", disable=not (cfg.progress and is_main),
               dynamic_ncols=True)

    def log(entry):
        if is_main:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    def save(path: Path, s: TrainState):
        check_finite((s.model, s.extra_head), s.step, _hint(s, cfg))  # on every process: they stop together
        if is_main:
            save_checkpoint(path, s, args)
        if path == last_path:
            s.saved_step = s.step

    def after_step(s: TrainState):
        nonlocal result_val
        if cfg.val_every and s.step % cfg.val_every == 0:
            crf = s.extra_head.crf if isinstance(s.extra_head, CRFasRNNHead) else None  # the CRF being trained
            result_val = evaluate(s.model, val_loader, num_classes=cfg.num_classes, preprocessing=cfg.preprocessing,
                                  device=dev, progress=False, ignore_index=cfg.ignore_index, crf=crf)
            log(dict(step=s.step, val=_brief(result_val)))
            set_train_mode(s.model, s.family)
            if result_val["miou"] > s.best_miou:
                s.best_miou = result_val["miou"]
                save(best_path, s)
        if cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.step != end:
            save(last_path, s)
        signum = stop.requested(dev)
        if signum is not None:
            if s.saved_step != s.step:
                save(last_path, s)
            if process_group() is not None:
                process_group().barrier()  # the checkpoint is complete before any process stops
            raise TrainingInterrupted(signum, s.step, str(last_path))

    set_train_mode(state.model, state.family)
    try:
        while state.step < end:
            epoch, skip = divmod(state.step, steps_per_epoch)
            loader = epoch_loader(dataset, transform, sampler, cfg, epoch, skip, rank, dev)
            train_one_epoch(state, loader, cfg, end=end, log=log, t0=t0, bar=bar, after_step=after_step)
        save(last_path, state)
    finally:
        bar.close()
        if is_main:
            log_file.close()
    group = process_group()
    if group is not None:
        group.barrier()  # the checkpoint is complete before any process returns
    result = dict(step=state.step, loss=state.last_loss, checkpoint=str(last_path), log=str(log_path),
                  world_size=world, seconds=time.perf_counter() - t0)
    if result_val is not None:
        result["val"] = result_val
    return result
