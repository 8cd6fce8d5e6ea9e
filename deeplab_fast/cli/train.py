"""``deeplab-fast train`` and ``deeplab-fast eval``: training and evaluating the DeepLab models on PASCAL VOC.

    deeplab-fast train (--model NAME | --recipe NAME) --data ROOT [--out DIR] [--steps N] [--batch-size N] [--lr LR]
                       [--crop-size PX] [--preprocessing caffe|torchvision] [--amp] [--init NAME|FILE|URL]
                       [--resume FILE]
    torchrun --nproc_per_node=G -m deeplab_fast train ...      the same on G GPUs (DistributedDataParallel)
    deeplab-fast train --crf-rnn PRESET --init OUT/last.pth --data ROOT [--crf-compat potts|matrix] [--crf-lr LR]
                       [--crf-iterations N] [--crf-checkpoint] ...   the CRF-as-RNN stage
    deeplab-fast eval --weights NAME|FILE|URL --data ROOT [--model NAME] [--split val] [--crf PRESET | --trained-crf]
                      [--scales 0.5,0.75,1] [--flip] [--num-classes N]

``train`` builds a :class:`deeplab_fast.train.TrainConfig` and runs :func:`deeplab_fast.train.train`. Defaults
follow the model's family (its paper recipe, ``deeplab_fast.train.RECIPES``; the README's table is made from
the same data); ``--recipe`` applies a whole recipe (model, model options, init weights, hyperparameters).
``--preprocessing`` defaults to that of the ``--init`` weights when they are registered, else to the
model's (caffe for v1/v2, torchvision for v3). ``--batch-size`` is per process: under ``torchrun`` the effective
batch is batch-size x processes. ``train`` writes ``OUT/last.pth`` and ``OUT/log.jsonl``; ``eval --weights``
and ``segment --weights`` read the checkpoint, ``--resume`` continues it.

Exit codes as the other commands: 0 success; 1 an unreadable or unusable checkpoint (``--weights``, ``--init``,
``--resume``), a failed download, a diverged run (the last finite checkpoint is kept) or out of memory; 2 bad
arguments or input (missing data root or file, ...); 143 / 130: ``train`` stopped by SIGTERM / SIGINT after
writing its checkpoint at the step boundary (``--resume`` continues it exactly); 130 other interrupts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .. import models
from ..data import VOCSegmentation
from ..models import VOC_CLASSES
from ..nn import PRESETS
from ..nn.crf import COMPAT_FORMS
from ..train import (FAMILIES, RECIPES, CRFasRNNStage, TrainConfig, evaluate, evaluation_loader, load_trained_crf,
                     load_training_checkpoint, read_training_checkpoint, resolve_preprocessing, train,
                     training_settings)
from ..train.families import DEFAULT_WEIGHT_DECAY
from ._common import (CLIError, add_preprocessing_option, crf_preset_parent, data_parent, device_parent,
                      finite_float, library_errors, load_model_from_options, model_kwargs_option, model_names,
                      model_options_parent, nonnegative_float, nonnegative_int, positive_float, positive_int,
                      resolve_device, scales, threads_parent)

__all__ = ["add_parsers", "run_train", "run_eval"]


def _check_data(root: str) -> None:
    if not Path(root).exists():
        raise CLIError(f"--data {root!r}: no such folder (expected a VOC2012 folder, or one holding "
                       "VOCdevkit/VOC2012)")
    if not Path(root).is_dir():
        raise CLIError(f"--data {root!r} is a file, expected the VOC2012 folder")


# ---------------------------------------------------------------------------------------------------------
# train


def _check_model_options(name: str, num_classes: int, kwargs: dict) -> None:
    """Bad model options are reported before any data or weights are read (built on the meta device: free)."""
    try:
        with torch.device("meta"):
            models.get_model(name, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--model {name} with {kwargs}: {exc}") from None


def _init_checkpoint_args(init) -> dict:
    """The ``"args"`` of a ``deeplab-fast train`` checkpoint given to --init ({} for anything else)."""
    if init is None or not os.path.isfile(init):
        return {}
    with library_errors(f"--init {init!r}: "):
        ckpt = read_training_checkpoint(init)
    return dict(ckpt["args"]) if ckpt is not None else {}


def _crf_stage(args, resumed: dict):
    """(the CRF-as-RNN stage or None, its learning rate) from --crf-rnn and its options; a resumed CRF-as-RNN run
    keeps its stage when --crf-rnn is not given."""
    options = [name for name, value in (("--crf-compat", args.crf_compat), ("--crf-lr", args.crf_lr),
                                        ("--crf-iterations", args.crf_iterations),
                                        ("--crf-checkpoint", args.crf_checkpoint or None)) if value is not None]
    if args.crf_rnn is None:
        saved = resumed.get("crf_rnn")
        if saved:
            if options:
                raise CLIError(f"{options[0]} with --resume of a CRF-as-RNN run: give --crf-rnn too, or leave the "
                               "CRF options to the checkpoint")
            return CRFasRNNStage(**saved), resumed.get("extra_head_lr")
        if options:
            raise CLIError(f"{options[0]} is an option of the CRF-as-RNN stage: give --crf-rnn PRESET too")
        return None, None
    stage = CRFasRNNStage(preset=args.crf_rnn, compat=args.crf_compat or "potts", iterations=args.crf_iterations,
                          checkpoint=args.crf_checkpoint)
    return stage, args.crf_lr


def run_train(args) -> int:
    # A 'deeplab-fast train' checkpoint as --init (e.g. the CRF-as-RNN stage's starting point) names its model,
    # options, classes and preprocessing: they are the defaults (training_settings).
    init_args = _init_checkpoint_args(args.init) if args.recipe is None else {}
    if args.model is None and args.recipe is None and not init_args.get("model"):
        raise CLIError("give --model NAME or --recipe NAME (see --help)")
    try:
        settings = training_settings(model=args.model, recipe=args.recipe, init_args=init_args,
                                     num_classes=args.num_classes, init=args.init, preprocessing=args.preprocessing,
                                     steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     crop_size=args.crop_size, weight_decay=args.weight_decay)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    args.model = settings["model"]
    _check_data(args.data)
    resumed = {}
    if args.resume is not None:
        if not Path(args.resume).is_file():
            raise CLIError(f"--resume {args.resume!r}: no such file")
        with library_errors(f"--resume {args.resume!r}: "):
            resumed = load_training_checkpoint(args.resume)["args"]
    stage, crf_lr = _crf_stage(args, resumed)
    settings["model_kwargs"].update(model_kwargs_option(args, models.model_entry(args.model).family))
    _check_model_options(args.model, settings["num_classes"], settings["model_kwargs"])
    init = settings["init"]
    if init is not None and args.resume is None:  # read (or downloaded) now, so that a bad file is one clear line
        settings["preprocessing"] = resolve_preprocessing(args.model, settings["preprocessing"], init)
        with library_errors(f"--init {init!r}: "):
            settings["init"] = models.load_weights_state_dict(models.resolve_weights(args.model, init))
    scale_range = (1.0, 1.0) if args.no_augment else (args.scale_min, args.scale_max)
    if scale_range[0] > scale_range[1]:
        raise CLIError(f"--scale-min {args.scale_min} is larger than --scale-max {args.scale_max}")
    resolve_device(args.device)  # a clear error for cuda without a GPU
    config = TrainConfig(
        **settings, data_root=args.data, out_dir=args.out or os.path.join("runs", args.model),
        momentum=args.momentum, power=args.power, amp=args.amp, device=args.device,
        resume=args.resume, log_every=args.log_every, seed=args.seed, val_every=args.val_every,
        workers=args.workers, progress=sys.stderr.isatty() and not args.no_progress, ckpt_every=args.ckpt_every,
        shuffle=not args.no_shuffle, scale_range=scale_range, flip=not args.no_augment, augmented=args.augmented,
        stop_at=args.stop_at, extra_head=stage, extra_head_lr=crf_lr)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with library_errors():
        result = train(config)
    if rank0:
        print(f"trained {args.model}{' + CRF-as-RNN' if stage else ''} to step {result['step']} on "
              f"{result['world_size']} process(es) in {result['seconds']:.1f} s; last loss {result['loss']:.4f}")
        if "val" in result:
            v = result["val"]
            print(f"val: mIoU {100 * v['miou']:.2f}, pixel accuracy {100 * v['pixel_accuracy']:.2f}"
                  + (f"; with the trained CRF: mIoU {100 * v['crf']['miou']:.2f}" if v.get("crf") else ""))
        if stage is not None:
            _print_learned_crf(result["checkpoint"])
        print(f"checkpoint: {result['checkpoint']}\nlog: {result['log']}")
    return 0


def _print_learned_crf(checkpoint) -> None:
    crf = load_trained_crf(checkpoint)
    for name in crf.trained:
        value = getattr(crf, name).detach()
        if value.dim() == 0:
            print(f"learned {name}: {float(value):.4g} (preset {crf.config()[name]:g})")
        else:
            diag = value.diagonal()
            print(f"learned {name}: {tuple(value.shape)} matrix, diagonal {float(diag.min()):.3g} .. "
                  f"{float(diag.max()):.3g} (preset {-crf.config()[name]:g}), off-diagonal |max| "
                  f"{float((value - torch.diag(diag)).abs().max()):.3g}")


# ---------------------------------------------------------------------------------------------------------
# eval


def _fmt(v: float) -> str:
    return "   n/a" if v != v else f"{100 * v:6.2f}"


def run_eval(args) -> int:
    if args.weights is None:
        raise CLIError("--weights is required: evaluation needs trained weights (a 'deeplab-fast train' "
                       "checkpoint such as OUT/last.pth, or see 'deeplab-fast segment --help')")
    _check_data(args.data)
    if args.trained_crf and args.crf:
        raise CLIError("--crf PRESET and --trained-crf: choose one (run eval twice to compare them)")
    if args.crf_iterations is not None and not args.trained_crf:
        raise CLIError("--crf-iterations is for --trained-crf (a preset has its own)")
    device = resolve_device(args.device)
    name, model, preprocessing, ckpt = load_model_from_options(args)
    num_classes = model.num_classes
    crf, crf_name = args.crf, args.crf
    if args.trained_crf:
        if ckpt is None:
            raise CLIError(f"--trained-crf: --weights {args.weights!r} is not a 'deeplab-fast train' checkpoint")
        with library_errors("--trained-crf: "):
            crf = load_trained_crf(ckpt, iterations=args.crf_iterations)
        crf_name = f"trained, {ckpt['args']['crf_rnn']['preset']}"
    with library_errors():
        loader = evaluation_loader(VOCSegmentation(args.data, split=args.split), workers=args.workers)
        result = evaluate(model, loader, num_classes=num_classes, preprocessing=preprocessing, crf=crf,
                          scales=args.scales, flip=args.flip, device=device,
                          progress=sys.stderr.isatty() and not args.no_progress)
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(f"class {i}" for i in range(num_classes))
    print(f"{name} on {args.data} [{args.split}], {result['num_images']} images, preprocessing {preprocessing}, "
          f"scales {','.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''}")
    if args.trained_crf:
        print(f"trained CRF: {crf!r}")
    crf = result["crf"]
    title = f"CRF ({crf_name})" if crf else ""
    wide = max(24, len(title) + 2)
    print(f"{'':<16}{'no CRF':>8}" + (f"{title:>{wide}}" if crf else ""))
    print(f"{'mIoU':<16}{_fmt(result['miou']):>8}" + (f"{_fmt(crf['miou']):>{wide}}" if crf else ""))
    print(f"{'pixel accuracy':<16}{_fmt(result['pixel_accuracy']):>8}"
          + (f"{_fmt(crf['pixel_accuracy']):>{wide}}" if crf else ""))
    print("per-class IoU:")
    for i, cls in enumerate(names):
        print(f"  {cls:<14}{_fmt(result['per_class_iou'][i]):>8}"
              + (f"{_fmt(crf['per_class_iou'][i]):>{wide}}" if crf else ""))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = dict(model=name, weights=args.weights, data=args.data, split=args.split, preprocessing=preprocessing,
                      scales=list(args.scales), flip=args.flip, **result)
        if args.trained_crf:
            record["crf_preset"] = crf_name
        path.write_text(json.dumps(record, indent=1, allow_nan=True))
        print(f"written: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# parsers


def _train_description() -> str:
    lines = ["Train a DeepLab model on PASCAL VOC 2012 (SGD, momentum 0.9, no weight decay on biases, the family's "
             "head at", "10x the base learning rate, poly schedule with power 0.9). Defaults per model (its "
             "recipe, else its family's):"]
    for f in FAMILIES.values():
        members = [n for n in models.list_models() if models.model_entry(n).family == f.name]
        for r in f.recipes:
            lines.append(f"  {f.name} ({r.model if len(f.recipes) > 1 else ', '.join(members)}): "
                         f"--steps {r.steps} --batch-size {r.batch_size} --lr {r.lr:g} --crop-size {r.crop_size}"
                         + (f" --weight-decay {r.weight_decay:g}" if r.weight_decay != DEFAULT_WEIGHT_DECAY else "")
                         + (f" --model-kwargs '{json.dumps(dict(r.family_model_kwargs))}'" if r.family_model_kwargs
                            else ""))
    lines.append("--recipe NAME applies a whole recipe (model, its options, --init weights, hyperparameters):")
    for r in RECIPES.values():
        lines.append(f"  {r.name}: {r.title}; --model {r.model}"
                     + (f" --model-kwargs '{json.dumps(dict(r.model_kwargs))}'" if r.model_kwargs else "")
                     + (f" --init {r.init}" if r.init else ""))
    lines.append("The loss and the head at 10x, per family:")
    for f in FAMILIES.values():
        lines.append(f"  {f.name}: {f.loss_doc}; head: {', '.join(f.head_attributes)}")
    lines += [
        "--batch-size is per process; under 'torchrun --nproc_per_node=G -m deeplab_fast train ...' (DDP: NCCL on",
        "CUDA, gloo on the CPU) the effective batch is G x batch-size. Writes OUT/last.pth (only finite weights;",
        "a diverged run stops with the step named), OUT/best.pth (with --val-every) and OUT/log.jsonl; --resume",
        "continues exactly, for any --workers. SIGTERM or Ctrl-C: a checkpoint at the next step, exit 143 / 130.",
        "CRF-as-RNN stage: --crf-rnn PRESET --init OUT/last.pth fine-tunes a trained model with a trainable dense",
        "CRF on top (the model, classes, options and --preprocessing default to the --init checkpoint's); 'eval",
        "--trained-crf' evaluates with the learned CRF."]
    return "\n".join(lines)


_EVAL_DESCRIPTION = """\
Evaluate a DeepLab model on a VOC split: mIoU, pixel accuracy and per-class IoU (the VOC devkit's measures),
from the softmax probabilities averaged over --scales (and mirrored inputs with --flip), and with --crf also
after the dense CRF on those probabilities. --weights: a 'deeplab-fast train' checkpoint (OUT/last.pth; its
model, options and --preprocessing are read from it) or any weights 'deeplab-fast segment' loads (a registered name, a
file or a URL)."""


def _init_help() -> str:
    names = sorted({k for n in models.list_models() for k in models.get_model_weights(n).__members__})
    return ("pretrained weights to start from: a registered weights name of the model (" + ", ".join(names)
            + "), a file or a URL; tensors matching by name and shape are loaded")


def add_parsers(sub) -> None:
    """Adds the ``train`` and ``eval`` commands to the ``deeplab-fast`` parser."""
    names = model_names()
    models_help = f"the architecture, one of {', '.join(names)}"
    common = [threads_parent(), device_parent(), data_parent(), model_options_parent()]

    tr = sub.add_parser("train", help="train a DeepLab model on PASCAL VOC (DDP under torchrun)",
                        description=_train_description(), formatter_class=argparse.RawDescriptionHelpFormatter,
                        parents=common)
    tr.add_argument("--model", default=None, metavar="NAME", choices=names,
                    help=models_help + " (default: the --recipe's)")
    tr.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                    help="a paper recipe: model, options, --init and hyperparameters (the explicit options win)")
    tr.add_argument("--out", metavar="DIR", default=None, help="output folder (default runs/MODEL)")
    tr.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                    help="classes (default: an --init training checkpoint's, else 21)")
    tr.add_argument("--steps", type=positive_int, default=None, metavar="N", help="iterations (default: recipe)")
    tr.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                    help="images per step and process (default: recipe)")
    tr.add_argument("--lr", type=positive_float, default=None, metavar="LR", help="base learning rate (default: "
                    "recipe; the classifier gets 10x)")
    tr.add_argument("--crop-size", type=positive_int, default=None, metavar="PX", help="training crop side "
                    "(default: the recipe's)")
    add_preprocessing_option(tr, "input normalisation (default: the --init weights', else the model's: caffe "
                                 "for v1/v2, torchvision for the others)")
    tr.add_argument("--augmented", action="store_true",
                    help="train on train_aug (SegmentationClassAug, the SBD-augmented 10,582 images)")
    tr.add_argument("--amp", action="store_true", help="mixed precision (float16 + GradScaler on CUDA, bfloat16 "
                    "on the CPU)")
    tr.add_argument("--resume", metavar="FILE", default=None, help="continue from a checkpoint (OUT/last.pth)")
    tr.add_argument("--init", metavar="NAME|FILE|URL", default=None, help=_init_help())
    tr.add_argument("--momentum", type=finite_float, default=0.9, metavar="M", help="(default 0.9)")
    tr.add_argument("--weight-decay", type=finite_float, default=None, metavar="W",
                    help="(default: the recipe's, 5e-4 but for the mobile models' 1e-6)")
    tr.add_argument("--power", type=finite_float, default=0.9, metavar="P", help="poly power (default 0.9)")
    tr.add_argument("--scale-min", type=positive_float, default=0.5, metavar="S", help="random scale (default 0.5)")
    tr.add_argument("--scale-max", type=positive_float, default=1.5, metavar="S", help="(default 1.5)")
    tr.add_argument("--no-augment", action="store_true", help="no random scaling or flipping (crops only)")
    tr.add_argument("--no-shuffle", action="store_true", help="go through the images in list order")
    tr.add_argument("--seed", type=nonnegative_int, default=0, metavar="N", help="(default 0)")
    tr.add_argument("--log-every", type=positive_int, default=10, metavar="N", help="log every N steps (default 10)")
    tr.add_argument("--ckpt-every", type=nonnegative_int, default=1000, metavar="N",
                    help="write OUT/last.pth every N steps, and at the end (default 1000)")
    tr.add_argument("--val-every", type=nonnegative_int, default=0, metavar="N",
                    help="evaluate on val every N steps, keeping the best mIoU's weights in OUT/best.pth (default 0: "
                         "never)")
    tr.add_argument("--stop-at", type=positive_int, default=None, metavar="N",
                    help="stop after step N (checkpoint written), to continue later with --resume")
    tr.add_argument("--workers", type=nonnegative_int, default=4, metavar="N", help="data loader workers (default 4)")
    crf = tr.add_argument_group(
        "CRF-as-RNN stage", "fine-tune a trained model (--init OUT/last.pth) end to end with a trainable dense CRF "
        "on its scores; the loss is the CRF marginals' negative log-likelihood at full resolution")
    crf.add_argument("--crf-rnn", metavar="PRESET", choices=sorted(PRESETS), default=None,
                     help=f"train with the CRF on top, its kernels and initial weights from PRESET "
                          f"({' or '.join(sorted(PRESETS))})")
    crf.add_argument("--crf-compat", choices=COMPAT_FORMS, default=None,
                     help="what the CRF learns: 'potts' (a weight per kernel, default) or 'matrix' (an L x L "
                          "compatibility per kernel, initialised to -weight x identity)")
    crf.add_argument("--crf-lr", type=nonnegative_float, default=None, metavar="LR",
                     help="the CRF's learning rate, no weight decay (default: --lr; 0 keeps the preset's weights: "
                          "the network alone is fine-tuned through the fixed CRF)")
    crf.add_argument("--crf-iterations", type=positive_int, default=None, metavar="N",
                     help="mean-field iterations in training (default: the preset's 10; CRF-as-RNN trains with 5)")
    crf.add_argument("--crf-checkpoint", action="store_true",
                     help="recompute the mean-field iterations in the backward instead of keeping them "
                          "(B x iterations x H x W x L floats, e.g. 250 MB per 512x512 image with 21 classes)")
    tr.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="mIoU of a DeepLab model on a VOC split, with and without the dense CRF",
                        description=_EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                        parents=common + [crf_preset_parent("also report the results after the dense CRF")])
    ev.add_argument("--model", default=None, metavar="NAME", choices=names,
                    help=models_help + " (default: the one a training checkpoint names)")
    ev.add_argument("--weights", metavar="NAME|FILE|URL", default=None, help="the weights (required)")
    ev.add_argument("--split", default="val", help="the image list (default val)")
    ev.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                    help="classes (default: read from the checkpoint)")
    ev.add_argument("--scales", type=scales, default=(1.0,), metavar="S,S,...",
                    help="input scales whose probabilities are averaged, e.g. 0.5,0.75,1.0 (default 1.0)")
    ev.add_argument("--flip", action="store_true", help="also average the mirrored inputs")
    add_preprocessing_option(ev, "input normalisation (default: the training checkpoint's, else the weights')")
    ev.add_argument("--workers", type=nonnegative_int, default=2, metavar="N", help="data loader workers")
    ev.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON")
    ev.add_argument("--trained-crf", action="store_true",
                    help="also report the results after the CRF a 'train --crf-rnn' run learned (read from the "
                         "--weights checkpoint), instead of a --crf preset")
    ev.add_argument("--crf-iterations", type=positive_int, default=None, metavar="N",
                    help="with --trained-crf: mean-field iterations (default: those it was trained with)")
    ev.set_defaults(run=run_eval)
