"""``deeplab-fast train`` and ``deeplab-fast eval``: training and evaluating the DeepLab models on PASCAL VOC.

    deeplab-fast train --model deeplab_v2_resnet101 --data ROOT [--out DIR] [--steps N] [--batch-size N] [--lr LR]
                       [--crop-size PX] [--mode caffe|torchvision] [--amp] [--resume FILE] [--device ...]
    torchrun --nproc_per_node=G -m deeplab_fast train ...      the same on G GPUs (DistributedDataParallel)
    deeplab-fast eval --model NAME --weights FILE --data ROOT [--split val] [--crf PRESET] [--scales 0.5,0.75,1]
                      [--flip] [--num-classes N]

Defaults follow the model family (``RECIPES``; the papers' settings, see the README): ``--mode caffe`` (BGR,
0-255, Caffe mean) for v1/v2, whose released weights were trained so, and ``torchvision`` (ImageNet mean/std)
for v3. ``--batch-size`` is per process: under ``torchrun`` the effective batch is batch-size x processes.
``train`` writes ``OUT/last.pth`` (model, optimizer, scheduler, scaler, step, args; ``--resume`` continues it,
``eval --weights`` and ``segment --weights`` read it) and ``OUT/log.jsonl`` (step, loss, lr, time).
The loops are :func:`deeplab_fast.train.train` and :func:`deeplab_fast.train.evaluate`.

Exit codes as the other commands: 0 success, 2 bad arguments or input (missing data root, weights...), 130
interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .cli import CLIError, _positive_int, _nonnegative_int, _positive_float, _float

__all__ = ["add_parsers", "RECIPES", "VOC_CLASSES", "run_train", "run_eval"]

# Per-family defaults: (steps, batch size, base lr, crop size, extra model kwargs). Sources in the README:
# v1: Chen et al. ICLR 2015 sec. 4.1 (batch 20, lr 1e-3, 6000 iterations; step policy there, poly here);
# v2: TPAMI 2017 sec. 4.1 / Table 4 (poly, batch 10, 20k iterations, 321 crops) with ResNet lr 2.5e-4
#     (the released prototxt, kazuto1011/deeplab-pytorch configs/voc12.yaml);
# v3: arXiv:1706.05587 sec. 4.1 (lr 7e-3, poly, crop 513, batch 16, output stride 16, 30k iterations).
RECIPES = {
    "v1": dict(steps=6000, batch_size=20, lr=1e-3, crop_size=321, model_kwargs={}),
    "v2": dict(steps=20000, batch_size=10, lr=2.5e-4, crop_size=321, model_kwargs={}),
    "v3": dict(steps=30000, batch_size=16, lr=7e-3, crop_size=513, model_kwargs={"output_stride": 16}),
}

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _family(name: str) -> str:
    from . import models
    from .train import model_family

    if name not in models.MODELS:
        raise CLIError(f"--model {name!r}: unknown; choose one of {', '.join(sorted(models.MODELS))}")
    return model_family(name)


def _model_kwargs(args, family: str) -> dict:
    kwargs = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--model-kwargs: not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            raise CLIError(f"--model-kwargs must be a JSON object, e.g. '{{\"msc\": true}}', got {args.model_kwargs!r}")
        if "num_classes" in kwargs:
            raise CLIError("--model-kwargs: give the number of classes with --num-classes")
    if args.width_divisor is not None:
        if family != "v1":
            raise CLIError(f"--width-divisor is for the v1 models (deeplab_v1_*), not {args.model}")
        kwargs["width_divisor"] = args.width_divisor
    return kwargs


def _check_data(root: str) -> None:
    if not Path(root).exists():
        raise CLIError(f"--data {root!r}: no such folder (expected a VOC2012 folder, or one holding "
                       "VOCdevkit/VOC2012)")
    if not Path(root).is_dir():
        raise CLIError(f"--data {root!r} is a file, expected the VOC2012 folder")


def _device_arg(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return name


# ---------------------------------------------------------------------------------------------------------
# train


def run_train(args) -> int:
    from . import models
    from .train import default_mode, train

    family = _family(args.model)
    recipe = RECIPES[family]
    _check_data(args.data)
    if args.resume is not None and not Path(args.resume).is_file():
        raise CLIError(f"--resume {args.resume!r}: no such file")
    kwargs = dict(recipe["model_kwargs"])
    kwargs.update(_model_kwargs(args, family))
    try:  # bad model options are reported before any data is read
        models.get_model(args.model, num_classes=args.num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--model {args.model} with {kwargs}: {exc}") from None
    steps = args.steps or recipe["steps"]
    scale_range = (1.0, 1.0) if args.no_augment else (args.scale_min, args.scale_max)
    if scale_range[0] > scale_range[1]:
        raise CLIError(f"--scale-min {args.scale_min} is larger than --scale-max {args.scale_max}")
    out = args.out or os.path.join("runs", args.model)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(args.model, args.data, out, num_classes=args.num_classes, steps=steps,
                       batch_size=args.batch_size or recipe["batch_size"], lr=args.lr or recipe["lr"],
                       crop_size=args.crop_size or recipe["crop_size"], mode=args.mode or default_mode(args.model),
                       momentum=args.momentum, weight_decay=args.weight_decay, power=args.power, amp=args.amp,
                       device=_device_arg(args.device), resume=args.resume, log_every=args.log_every,
                       model_kwargs=kwargs, seed=args.seed, val_every=args.val_every, workers=args.workers,
                       progress=sys.stderr.isatty() and not args.no_progress, ckpt_every=args.ckpt_every,
                       shuffle=not args.no_shuffle, scale_range=scale_range, flip=not args.no_augment,
                       augmented=args.augmented, stop_at=args.stop_at, init=args.init)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if rank0:
        print(f"trained {args.model} to step {result['step']} on {result['world_size']} process(es) in "
              f"{result['seconds']:.1f} s; last loss {result['loss']:.4f}")
        if "val" in result:
            v = result["val"]
            print(f"val: mIoU {100 * v['miou']:.2f}, pixel accuracy {100 * v['pixel_accuracy']:.2f}")
        print(f"checkpoint: {result['checkpoint']}\nlog: {result['log']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# eval


def _parse_scales(text: str) -> tuple:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,0.75,1.0, got {text!r}") from None
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return scales


def _training_checkpoint(path: str):
    """The ``train`` checkpoint dict (with "model" and "args") in ``path``, or None for any other file."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_model reports unreadable files with its own message
        return None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("args"), dict):
        return obj
    return None


def _load_eval_model(args):
    """(model name, model, the training args or {}) for ``eval``."""
    from . import models
    from .cli_models import WEIGHTS_HELP, _num_classes, load_model

    if not Path(args.weights).is_file():
        raise CLIError(f"--weights {args.weights!r}: no such file")
    ckpt = _training_checkpoint(args.weights)
    saved = ckpt["args"] if ckpt is not None else {}
    name = args.model or saved.get("model")
    if name is None:
        raise CLIError("--model is required (the weights are not a 'deeplab-fast train' checkpoint naming it)")
    family = _family(name)
    kwargs = dict(saved.get("model_kwargs") or {}) if saved.get("model") == name else {}
    args.model = name
    kwargs.update(_model_kwargs(args, family))
    if ckpt is None and not kwargs:
        return name, load_model(name, args.weights, args.num_classes), saved
    # Our training checkpoint (or options load_model does not take): build with the kwargs, load strictly.
    try:
        state = models.load_checkpoint(args.weights)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        raise CLIError(f"--weights {args.weights!r}: {exc}") from None
    classes = args.num_classes or saved.get("num_classes") or _num_classes(state)
    if classes is None:
        raise CLIError(f"--weights {args.weights!r}: cannot tell the number of classes; give --num-classes")
    try:
        model = models.get_model(name, num_classes=classes, **kwargs)
        models.load_weights(model, state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(f"--weights {args.weights!r} does not fit --model {name} {kwargs or ''}: {first}\n"
                       f"{WEIGHTS_HELP}") from None
    return name, model.eval(), saved


def _fmt(v: float) -> str:
    return "   n/a" if v != v else f"{100 * v:6.2f}"


def run_eval(args) -> int:
    from .nn import PRESETS
    from .train import default_mode, evaluate

    if args.weights is None:
        raise CLIError("--weights is required: evaluation needs trained weights (a 'deeplab-fast train' "
                       "checkpoint such as OUT/last.pth, or see 'deeplab-fast segment --help')")
    if args.crf is not None and args.crf not in PRESETS:
        raise CLIError(f"--crf {args.crf!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    _check_data(args.data)
    device = _device_arg(args.device)
    name, model, saved = _load_eval_model(args)
    mode = args.mode or saved.get("mode") or default_mode(name)
    num_classes = model.num_classes
    try:
        result = evaluate(model, args.data, split=args.split, num_classes=num_classes, mode=mode, crf=args.crf,
                          scales=args.scales, flip=args.flip, device=device,
                          progress=sys.stderr.isatty() and not args.no_progress, workers=args.workers)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(f"class {i}" for i in range(num_classes))
    crf = result["crf"]
    print(f"{name} on {args.data} [{args.split}], {result['num_images']} images, mode {mode}, scales "
          f"{','.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''}")
    header = f"{'':<16}{'no CRF':>8}" + (f"{'CRF (' + args.crf + ')':>24}" if crf else "")
    print(header)
    print(f"{'mIoU':<16}{_fmt(result['miou']):>8}" + (f"{_fmt(crf['miou']):>24}" if crf else ""))
    print(f"{'pixel accuracy':<16}{_fmt(result['pixel_accuracy']):>8}"
          + (f"{_fmt(crf['pixel_accuracy']):>24}" if crf else ""))
    print("per-class IoU:")
    for i, cls in enumerate(names):
        print(f"  {cls:<14}{_fmt(result['per_class_iou'][i]):>8}"
              + (f"{_fmt(crf['per_class_iou'][i]):>24}" if crf else ""))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = dict(model=name, weights=args.weights, data=args.data, split=args.split, mode=mode,
                      scales=list(args.scales), flip=args.flip, **result)
        path.write_text(json.dumps(record, indent=1, allow_nan=True))
        print(f"written: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# parsers

_TRAIN_DESCRIPTION = """\
Train a DeepLab model on PASCAL VOC 2012 (SGD, momentum 0.9, weight decay 5e-4, the classifier at 10x the
base learning rate, poly schedule with power 0.9). Defaults per model family (the papers' recipes):
  v1 (deeplab_v1_*):  --steps 6000  --batch-size 20 --lr 1e-3   --crop-size 321 --mode caffe
  v2 (deeplab_v2_*):  --steps 20000 --batch-size 10 --lr 2.5e-4 --crop-size 321 --mode caffe (frozen BN)
  v3 (deeplab_v3_*):  --steps 30000 --batch-size 16 --lr 7e-3   --crop-size 513 --mode torchvision, OS 16
The loss: v1/v2 cross-entropy at 1/8 against downsampled labels (v2 --model-kwargs '{"msc": true}': the MSC
loss); v3 cross-entropy on the upsampled logits (+0.4 x aux with '{"aux_loss": true}').
--batch-size is per process; under 'torchrun --nproc_per_node=G -m deeplab_fast train ...' (DDP: NCCL on CUDA,
gloo on the CPU) the effective batch is G x batch-size. Writes OUT/last.pth and OUT/log.jsonl."""

_EVAL_DESCRIPTION = """\
Evaluate a DeepLab model on a VOC split: mIoU, pixel accuracy and per-class IoU (the VOC devkit's measures),
from the softmax probabilities averaged over --scales (and mirrored inputs with --flip), and with --crf also
after the dense CRF on those probabilities. --weights: a 'deeplab-fast train' checkpoint (OUT/last.pth; its
model, options and --mode are read from it) or any weights 'deeplab-fast segment' loads."""


def add_parsers(sub) -> None:
    """Adds the ``train`` and ``eval`` commands to the ``deeplab-fast`` parser."""
    from .models import MODELS

    models_help = f"the architecture, one of {', '.join(sorted(MODELS))}"

    tr = sub.add_parser("train", help="train a DeepLab model on PASCAL VOC (DDP under torchrun)",
                        description=_TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--model", required=True, metavar="NAME", help=models_help)
    tr.add_argument("--data", required=True, metavar="ROOT", help="the VOC2012 folder (or one holding VOCdevkit/)")
    tr.add_argument("--out", metavar="DIR", default=None, help="output folder (default runs/MODEL)")
    tr.add_argument("--num-classes", type=_positive_int, default=21, metavar="N", help="classes (default 21)")
    tr.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="iterations (default: recipe)")
    tr.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                    help="images per step and process (default: recipe)")
    tr.add_argument("--lr", type=_positive_float, default=None, metavar="LR", help="base learning rate (default: "
                    "recipe; the classifier gets 10x)")
    tr.add_argument("--crop-size", type=_positive_int, default=None, metavar="PX", help="training crop side "
                    "(default: 321 for v1/v2, 513 for v3)")
    tr.add_argument("--mode", choices=("caffe", "torchvision"), default=None,
                    help="input normalisation (default: caffe for v1/v2, torchvision for v3)")
    tr.add_argument("--augmented", action="store_true",
                    help="train on train_aug (SegmentationClassAug, the SBD-augmented 10,582 images)")
    tr.add_argument("--amp", action="store_true", help="mixed precision (float16 + GradScaler on CUDA, bfloat16 "
                    "on the CPU)")
    tr.add_argument("--resume", metavar="FILE", default=None, help="continue from a checkpoint (OUT/last.pth)")
    tr.add_argument("--init", metavar="FILE", default=None,
                    help="pretrained weights to start from (torchvision vgg16 / resnet / deeplabv3, kazuto1011 "
                         "DeepLab-v2, or ours): tensors matching by name and shape are loaded")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    tr.add_argument("--width-divisor", type=_positive_int, default=None, metavar="D",
                    help="v1 only: divide every channel count by D (a small model for quick experiments)")
    tr.add_argument("--model-kwargs", metavar="JSON", default=None,
                    help="more model options as JSON, e.g. '{\"msc\": true}' (v2), '{\"aux_loss\": true}' (v3), "
                         "'{\"dropout\": 0}' (v1)")
    tr.add_argument("--momentum", type=_float, default=0.9, metavar="M", help="(default 0.9)")
    tr.add_argument("--weight-decay", type=_float, default=5e-4, metavar="W", help="(default 5e-4)")
    tr.add_argument("--power", type=_float, default=0.9, metavar="P", help="poly power (default 0.9)")
    tr.add_argument("--scale-min", type=_positive_float, default=0.5, metavar="S", help="random scale (default 0.5)")
    tr.add_argument("--scale-max", type=_positive_float, default=1.5, metavar="S", help="(default 1.5)")
    tr.add_argument("--no-augment", action="store_true", help="no random scaling or flipping (crops only)")
    tr.add_argument("--no-shuffle", action="store_true", help="go through the images in list order")
    tr.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N", help="(default 0)")
    tr.add_argument("--log-every", type=_positive_int, default=10, metavar="N", help="log every N steps (default 10)")
    tr.add_argument("--ckpt-every", type=_nonnegative_int, default=1000, metavar="N",
                    help="write OUT/last.pth every N steps, and at the end (default 1000)")
    tr.add_argument("--val-every", type=_nonnegative_int, default=0, metavar="N",
                    help="evaluate on val every N steps (default 0: never)")
    tr.add_argument("--stop-at", type=_positive_int, default=None, metavar="N",
                    help="stop after step N (checkpoint written), to continue later with --resume")
    tr.add_argument("--workers", type=_nonnegative_int, default=4, metavar="N", help="data loader workers (default 4)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads")
    tr.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="mIoU of a DeepLab model on a VOC split, with and without the dense CRF",
                        description=_EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default=None, metavar="NAME",
                    help=models_help + " (default: the one a training checkpoint names)")
    ev.add_argument("--weights", metavar="FILE", default=None, help="the checkpoint (required)")
    ev.add_argument("--data", required=True, metavar="ROOT", help="the VOC2012 folder (or one holding VOCdevkit/)")
    ev.add_argument("--split", default="val", help="the image list (default val)")
    ev.add_argument("--num-classes", type=_positive_int, default=None, metavar="N",
                    help="classes (default: read from the checkpoint)")
    ev.add_argument("--crf", metavar="PRESET", default=None,
                    help="also report the results after the dense CRF: 'pydensecrf' or 'deeplab_v2_voc'")
    ev.add_argument("--scales", type=_parse_scales, default=(1.0,), metavar="S,S,...",
                    help="input scales whose probabilities are averaged, e.g. 0.5,0.75,1.0 (default 1.0)")
    ev.add_argument("--flip", action="store_true", help="also average the mirrored inputs")
    ev.add_argument("--mode", choices=("caffe", "torchvision"), default=None,
                    help="input normalisation (default: the training checkpoint's, else caffe for v1/v2, "
                         "torchvision for v3)")
    ev.add_argument("--width-divisor", type=_positive_int, default=None, metavar="D",
                    help="v1 only: the model's width divisor (read from a training checkpoint)")
    ev.add_argument("--model-kwargs", metavar="JSON", default=None, help="more model options as JSON")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--workers", type=_nonnegative_int, default=2, metavar="N", help="data loader workers")
    ev.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads")
    ev.set_defaults(run=run_eval)
