"""The training and evaluation loops of the DeepLab models (``deeplab-fast train`` / ``deeplab-fast eval``).

``train(...)`` runs SGD (momentum, weight decay, the head at 10x the base learning rate through
:func:`deeplab_fast.train.param_groups`) with the poly schedule (:func:`deeplab_fast.train.poly_lr`, a
``torch.optim.lr_scheduler.PolynomialLR`` stepped every iteration) on ``VOCSegmentation(data_root, "train")``
with :class:`~deeplab_fast.data.transforms.TrainTransform` crops. The loss follows the model family:

* v1 (``deeplab_v1_*``) and v2 (``deeplab_v2_*``): cross-entropy on the 1/8-resolution scores
  (``forward_logits``) against labels downsampled to that grid (``downsampled_cross_entropy``, the Caffe
  recipe); v2 with ``msc=True``: ``msc_loss`` over the per-scale and max-fused scores (kazuto1011's recipe).
  v2 trains with frozen BatchNorm statistics (``DeepLabV2.freeze_bn``), as the paper and kazuto1011.
* v3 (``deeplab_v3_*``): cross-entropy on the logits upsampled to the crop (``upsampled_cross_entropy``), plus
  0.4 x the auxiliary head's loss with ``aux_loss=True`` (torchvision's reference recipe).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA, gloo on the CPU), the
model is wrapped in ``DistributedDataParallel`` and the data split by ``DistributedSampler``; ``batch_size``
is per process (torchvision's convention), so the effective batch is ``batch_size x WORLD_SIZE``. Only rank 0
writes the checkpoint and the log and shows the progress bar.

Checkpoint ``out_dir/last.pth``: a dict ``{"model", "optimizer", "scheduler", "scaler", "step", "args",
"rng"}`` (``model`` is the plain model's state dict, so ``models.load_checkpoint`` and ``deeplab-fast
segment/eval --weights`` read it), written atomically every ``ckpt_every`` steps and at the end.
``resume=path`` restores all of it and continues from the saved step (up to ``steps``; a larger ``steps`` than
the checkpoint's extends the poly schedule, recomputed in closed form at the saved step).
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
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train", "evaluate", "default_mode", "model_family"]


def model_family(model_name: str) -> str:
    """"v1", "v2" or "v3" from a model name (``deeplab_v1_largefov`` ...); ValueError otherwise."""
    for fam in ("v1", "v2", "v3"):
        if model_name.startswith(f"deeplab_{fam}"):
            return fam
    raise ValueError(f"unknown model family for {model_name!r} (expected deeplab_v1_*, deeplab_v2_* or deeplab_v3_*)")


def default_mode(model_name: str) -> str:
    """The input normalisation a model family's released weights expect: "caffe" (BGR, 0-255, mean subtracted)
    for v1/v2, "torchvision" (RGB in [0, 1], ImageNet mean/std) for v3."""
    return "torchvision" if model_family(model_name) == "v3" else "caffe"


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
# training


class _TrainForward(nn.Module):
    """What the loss needs from the model, as ``forward`` (so that DistributedDataParallel sees it):
    v1/v2 the 1/8 scores (``forward_logits``), v2 MSC the per-scale list (``msc_logits``), v3 ``forward``."""

    def __init__(self, model: nn.Module, family: str):
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, x):
        m = self.model
        if self.family == "v3":
            return m(x)
        if self.family == "v2" and getattr(m, "msc", False) is True:
            return m.msc_logits(x)
        return m.forward_logits(x)


def _loss(family: str, out, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from . import downsampled_cross_entropy, msc_loss, upsampled_cross_entropy

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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def init_weights(model: nn.Module, init) -> tuple:
    """Loads pretrained weights into ``model`` before training, as the paper recipes start: every tensor of the
    checkpoint whose name and shape match the model's is copied, the rest (e.g. a classifier for other classes)
    keeps its initialisation. Understood layouts: this library's models, torchvision's DeepLabV3, kazuto1011's
    DeepLab-v2 checkpoints (converted), torchvision's ``vgg16`` (into v1's ``features``) and ``resnet50/101``
    (into ``backbone``). Returns (tensors loaded, tensors in the model); raises ValueError when nothing matches.
    """
    from .. import models

    state = models.load_checkpoint(init) if isinstance(init, (str, Path)) else dict(init)
    if models.is_kazuto_deeplabv2(state):
        state = models.convert_kazuto_deeplabv2(state)
    own = model.state_dict()
    if not any(k in own for k in state):  # an ImageNet backbone: torchvision's resnet under "backbone."
        state = {f"backbone.{k}": v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ValueError("init: no tensor of the checkpoint matches the model by name and shape")
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


def train(model_name: str, data_root, out_dir, *, num_classes: int, steps: int, batch_size: int, lr: float,
          crop_size: int, mode: Optional[str] = None, momentum: float = 0.9, weight_decay: float = 5e-4,
          power: float = 0.9, amp: bool = False, device="auto", resume=None, log_every: int = 10,
          model_kwargs: Optional[dict] = None, seed: int = 0, val_every: int = 0, workers: int = 0,
          progress: bool = True, ckpt_every: int = 1000, shuffle: bool = True,
          scale_range: Sequence[float] = (0.5, 1.5), flip: bool = True, augmented: bool = False,
          ignore_index: int = 255, head_lr_mult: float = 10.0, stop_at: Optional[int] = None,
          sync_bn: bool = False, init=None) -> dict:
    """Trains ``model_name`` on ``VOCSegmentation(data_root, "train", augmented)``; see the module docstring.

    Args (beyond the obvious): ``mode`` "caffe" or "torchvision" (None: :func:`default_mode`); ``batch_size``
    per process; ``lr`` the base learning rate (the head gets ``head_lr_mult`` x); ``amp``: float16 autocast with
    a GradScaler on CUDA, bfloat16 autocast on the CPU; ``model_kwargs`` passed to ``get_model`` (e.g.
    ``{"width_divisor": 8}``, ``{"msc": True}``, ``{"output_stride": 16, "aux_loss": True}``); ``shuffle``,
    ``scale_range``, ``flip``: data order and augmentation (``shuffle=False, scale_range=(1, 1), flip=False``
    make a run deterministic); ``stop_at``: stop after that step (checkpoint written) as if interrupted, to be
    continued with ``resume``; ``sync_bn``: SyncBatchNorm under DDP (v3); ``init``: pretrained weights (a path
    or a state dict) loaded before training, see :func:`init_weights` (ignored when resuming).

    Returns ``{"step", "loss" (last logged), "checkpoint", "log", "world_size", "seconds"}`` plus ``"val"``
    (the last :func:`evaluate` result) when ``val_every`` > 0. Every process returns; only rank 0 writes.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from .. import models
    from ..data import VOCSegmentation
    from ..data.transforms import TrainTransform
    from . import param_groups, poly_lr

    family = model_family(model_name)
    mode = mode or default_mode(model_name)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train: steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rank, world, local_rank, created_group = _init_distributed(str(device))
    try:
        dev = _resolve_device(device, local_rank)
        out_dir = Path(out_dir)
        ckpt_path, log_path = out_dir / "last.pth", out_dir / "log.jsonl"
        model_kwargs = dict(model_kwargs or {})
        args = dict(model=model_name, data_root=str(data_root), num_classes=num_classes, steps=steps,
                    batch_size=batch_size, world_size=world, lr=lr, crop_size=crop_size, mode=mode,
                    momentum=momentum, weight_decay=weight_decay, power=power, amp=bool(amp), seed=seed,
                    model_kwargs=model_kwargs, shuffle=shuffle, scale_range=list(scale_range), flip=flip,
                    augmented=augmented, head_lr_mult=head_lr_mult)

        torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
        model = models.get_model(model_name, num_classes=num_classes, **model_kwargs)
        if init is not None and resume is None:
            loaded, total = init_weights(model, init)
            if rank == 0:
                print(f"init: {loaded} of {total} tensors loaded from "
                      f"{init if isinstance(init, (str, Path)) else 'the given state dict'}", flush=True)
        if sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(dev)
        optimizer = torch.optim.SGD(param_groups(model, lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult),
                                    lr=lr, momentum=momentum, weight_decay=weight_decay)
        scheduler = poly_lr(optimizer, steps, power=power)
        use_scaler = bool(amp) and dev.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        autocast_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16

        step = 0
        if resume is not None:
            ckpt = torch.load(os.fspath(resume), map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = int(ckpt["step"])
            saved_sched = ckpt.get("scheduler") or {}
            if saved_sched.get("total_iters") == steps:
                scheduler.load_state_dict(saved_sched)
            else:  # another schedule length: the poly value at `step` of the new one, then recursive steps
                factor = max(0.0, 1.0 - min(step, steps) / steps) ** power
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                scheduler.last_epoch = step
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if world == 1 and isinstance(ckpt.get("rng"), torch.Tensor):
                torch.set_rng_state(ckpt["rng"])
            else:
                torch.manual_seed(seed + 1000 * rank + step)
        else:
            torch.manual_seed(seed + 1000 * rank)  # augmentation / dropout: different on each process

        net = _TrainForward(model, family)
        if world > 1:
            net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)

        transform = TrainTransform(crop_size=crop_size, scale_range=tuple(scale_range), flip=flip, mode=mode,
                                   ignore_index=ignore_index)
        dataset = VOCSegmentation(data_root, split="train", augmented=augmented, transform=transform)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=True)
        steps_per_epoch = len(sampler) // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"train: {len(dataset)} training images are fewer than one batch of {batch_size} "
                             f"per process x {world} process(es)")

        is_main = rank == 0
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "a" if resume is not None else "w", encoding="utf-8")
        last_loss = float("nan")
        result_val = None
        t0 = time.perf_counter()
        end = steps if stop_at is None else min(steps, max(stop_at, step))
        bar = tqdm(total=steps, initial=step, unit="step", disable=not (progress and is_main), dynamic_ncols=True)

        def save():
            if is_main:
                _atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), step=step,
                                  args=args, rng=torch.get_rng_state()), ckpt_path)

        def log(entry):
            if is_main:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()

        _set_train_mode(model, family)
        try:
            while step < end:
                epoch, skip = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch)
                indices = list(sampler)[skip * batch_size:]  # resume mid-epoch where the run stopped
                # Its own generator: the loader's per-iterator seed draw (worker seeds) must not consume the
                # global RNG, or a resumed run would draw different augmentations / dropout masks.
                loader_gen = torch.Generator().manual_seed(seed + 7919 * epoch + 1000003 * rank)
                loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                                    drop_last=True, pin_memory=dev.type == "cuda", generator=loader_gen)
                for image, target in loader:
                    image = image.to(dev, non_blocking=True)
                    target = target.to(dev, non_blocking=True)
                    with torch.autocast(device_type=dev.type, dtype=autocast_dtype, enabled=bool(amp)):
                        out = net(image)
                    loss = _loss(family, _to_float(out), target, ignore_index)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    lr_now = optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    if step % log_every == 0 or step == end:
                        value = loss.detach().float()
                        d = _dist()
                        if d is not None:
                            d.all_reduce(value)
                            value /= world
                        last_loss = float(value)
                        if not math.isfinite(last_loss):
                            raise FloatingPointError(f"train: the loss is {last_loss} at step {step}; lower --lr")
                        log(dict(step=step, loss=last_loss, lr=lr_now, time=round(time.perf_counter() - t0, 3)))
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr_now:.2e}")
                    if ckpt_every and step % ckpt_every == 0 and step != end:
                        save()
                    if val_every and step % val_every == 0:
                        result_val = evaluate(model, data_root, split="val", num_classes=num_classes, mode=mode,
                                              device=dev, progress=False, ignore_index=ignore_index)
                        log(dict(step=step, val=_brief(result_val)))
                        _set_train_mode(model, family)
                    if step >= end:
                        break
            save()
        finally:
            bar.close()
            if is_main:
                log_file.close()
        d = _dist()
        if d is not None:
            d.barrier()  # the checkpoint is complete before any process returns
        result = dict(step=step, loss=last_loss, checkpoint=str(ckpt_path), log=str(log_path), world_size=world,
                      seconds=time.perf_counter() - t0)
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
    return {k: metrics[k] for k in ("miou", "pixel_accuracy", "per_class_iou") if k in metrics}


# ---------------------------------------------------------------------------------------------------------
# evaluation


def _metrics(cm) -> dict:
    def num(v):
        return float(v.item() if isinstance(v, torch.Tensor) else v)

    per_class = cm.per_class_iou()
    per_class = per_class.tolist() if isinstance(per_class, torch.Tensor) else [num(v) for v in per_class]
    return dict(miou=num(cm.miou()), pixel_accuracy=num(cm.pixel_accuracy()), per_class_iou=per_class)


@torch.no_grad()
def evaluate(model: nn.Module, data_root, *, split: str = "val", num_classes: int, mode: str, crf=None,
             scales: Sequence[float] = (1.0,), flip: bool = False, device="auto", progress: bool = True,
             ignore_index: int = 255, workers: int = 0) -> dict:
    """mIoU, pixel accuracy and per-class IoU of ``model`` on ``VOCSegmentation(data_root, split)``.

    Each image is normalised by ``EvalTransform(mode)`` and run whole (batch 1) at every scale in ``scales``
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
    from . import ConfusionMatrix

    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"evaluate: scales must be positive numbers, got {scales}")
    dev = _resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    crf_layer = DenseCRF.from_preset(crf) if isinstance(crf, str) else crf
    dataset = VOCSegmentation(data_root, split=split, transform=None)
    transform = EvalTransform(mode=mode)
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
