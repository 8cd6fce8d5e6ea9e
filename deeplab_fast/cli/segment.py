"""``deeplab-fast segment`` and ``deeplab-fast bench``: the DeepLab models from the command line.

    deeplab-fast segment IMAGE... --model deeplab_v3_resnet101 --weights NAME|FILE|URL [--crf PRESET] [--out DIR]
    deeplab-fast bench [--models NAME...] [--size 513] [--batch 1 [16]] [--device cpu|cuda] [--json FILE]

``segment`` writes, per image, ``<stem>.png`` (the labels as a palette PNG, PASCAL VOC colours) and
``<stem>_overlay.png`` (the colours blended over the photo) into ``--out``, and prints the per-image time split
into network and CRF. Folders are expanded to their images, with a progress bar; images of one size are batched
(``--batch``, default 8 on CUDA, 1 on the CPU). ``--weights`` is what ``deeplab_fast.models.get_model`` takes:
a registered weights name, a checkpoint file or a URL; the input is normalised as the weights' ``transforms()``
say.

``bench`` measures images/s of each model in its forms on the same input (``deeplab_fast.benchmark``), with a
progress bar, and prints a table naming the device; ``--json`` writes it. On the CPU it defaults to batch 1 and 3
timed calls (about a minute per model on 2 cores); ``--batch 1 16`` adds the batch-16 rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import IMAGE_EXTS, list_images, load_photo, save_image, save_palette_png
from ._common import (EXIT_FAILED, CLIError, check_output_path, crf_preset_parent, device_parent, library_errors,
                      load_model, model_names, positive_int, resolve_device, threads_parent)

__all__ = ["add_parsers", "run_segment", "run_bench", "weights_help"]


def weights_help() -> str:
    """What ``--weights`` takes, with the registered names of every model."""
    from .. import models

    lines = ["--weights takes a registered weights name, a checkpoint file or an http(s):// / file:// URL "
             "(downloads go to torch.hub's cache). Registered:"]
    for name in models.list_models():
        members = ", ".join(k for k, m in models.get_model_weights(name).__members__.items() if not m.backbone_only)
        lines.append(f"  {name}: {members or 'none (backbone weights only, for train --init)'}")
    lines.append("Files: torchvision's DeepLabV3 state dicts, kazuto1011/deeplab-pytorch's DeepLab-v2 checkpoints "
                 "(recognised by their released file names), or a state dict saved from a deeplab_fast.models model "
                 "(OUT/last.pth of 'deeplab-fast train' too). The number of classes is read from the checkpoint "
                 "unless --num-classes is given.")
    return "\n".join(lines)


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, IMAGE_EXTS)
            if not found:
                raise CLIError(f"IMAGE {item!r}: the folder has no images ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise CLIError(f"IMAGE {item!r}: no such file or folder")
    return paths


def run_segment(args) -> int:
    import torch
    from tqdm import tqdm

    from ..benchmark import logits_of
    from ..data.voc import colorize, voc_palette
    from ..nn import DenseCRF

    if args.weights is None:
        raise CLIError(f"--weights is required: segmentation needs trained weights.\n{weights_help()}")
    paths = _collect_images(args.images)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {args.out!r} is a file, not a folder")
    device = resolve_device(args.device)
    model, weights = load_model(args.model, args.weights, args.num_classes)
    preprocess = weights.transforms()
    if args.optimize:
        from .. import optimize
        model = optimize(model, inplace=True)
    model = model.to(device)
    crf = DenseCRF.from_preset(args.crf) if args.crf else None
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (8 if device.type == "cuda" else 1)

    # Group consecutive images of one size into batches.
    with library_errors():
        photos = [(p, load_photo(p, "IMAGE")) for p in paths]
    for p, _ in photos:
        for suffix in (".png", "_overlay.png"):
            check_output_path(out_dir / f"{p.stem}{suffix}", "output", paths)
    groups: list[list] = []
    for item in photos:
        if groups and len(groups[-1]) < batch and groups[-1][0][1].shape == item[1].shape:
            groups[-1].append(item)
        else:
            groups.append([item])

    bar = tqdm(total=len(photos), unit="img", disable=len(photos) < 2 or not sys.stderr.isatty())
    totals = [0.0, 0.0]
    palette = voc_palette()
    for group in groups:
        images = np.stack([a for _, a in group])
        x = preprocess(images).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = logits_of(model(x))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_net = (time.perf_counter() - t0) / len(group)
        t_crf = 0.0
        if crf is not None:
            t1 = time.perf_counter()
            rgb = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
            probs = crf(logits, rgb)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_crf = (time.perf_counter() - t1) / len(group)
            labels = probs.argmax(1)
        else:
            labels = logits.argmax(1)
        labels = labels.cpu().numpy().astype(np.uint8)
        for (path, photo), lab in zip(group, labels):
            colours = colorize(lab)
            overlay = (0.5 * photo.astype(np.float32) + 0.5 * colours.astype(np.float32)).round().astype(np.uint8)
            with library_errors(code=EXIT_FAILED):
                save_palette_png(lab, palette, out_dir / f"{path.stem}.png")
                save_image(overlay, out_dir / f"{path.stem}_overlay.png", "overlay")
            present = ", ".join(str(int(v)) for v in np.unique(lab))
            tqdm.write(f"{path.name}: {photo.shape[1]}x{photo.shape[0]}, network {1e3 * t_net:.1f} ms"
                       + (f", CRF {1e3 * t_crf:.1f} ms" if crf is not None else "") + f"; labels {present}")
            totals[0] += t_net
            totals[1] += t_crf
            bar.update(1)
    bar.close()
    n = len(photos)
    print(f"{n} image(s) on {device}: network {1e3 * totals[0] / n:.1f} ms/image"
          + (f", CRF {1e3 * totals[1] / n:.1f} ms/image" if crf is not None else "") + f"; written to {out_dir}")
    return 0


def run_bench(args) -> int:
    import torch
    from tqdm import tqdm

    from .. import models
    from ..benchmark import bench_forms, bench_rows, device_name, load_torchvision

    names = args.models or models.list_models()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if dtype == torch.bfloat16 and not gpu:
        raise CLIError("--dtype bf16 is for the GPU (--device cuda)")
    batches = args.batch or ([1, 16] if gpu else [1])
    repeat = args.repeat or (10 if gpu else 3)
    crf = not args.no_crf
    described = device_name(device)
    print(f"device: {described}; {args.dtype}, {args.size}x{args.size}, batch {' '.join(map(str, batches))}, "
          f"{repeat} timed calls per row after a warm-up" + ("" if gpu or 16 in batches else
                                                              " (--batch 1 16 adds the batch-16 rows)"))
    tv, note = load_torchvision()
    if tv is None or note:
        print(f"torchvision: {note}")
    calls = sum(len(bench_forms(name, crf)) * len(batches) * (repeat + 1) for name in names)
    rows = []
    with tqdm(total=calls, unit="call", desc="bench", dynamic_ncols=True, disable=None) as bar:
        for name in names:
            for batch in batches:
                bar.set_postfix_str(f"{name} batch {batch}")
                for row in bench_rows(name, args.size, batch, device, dtype, repeat, crf=crf,
                                      on_call=lambda: bar.update(1)):
                    rows.append(row)
                    if row["median_s"] is None:
                        bar.write(f"  {row['model']:<26} batch {batch:>3}  {row['impl']:<34} not measured: "
                                  f"{row['skipped']}")
                    else:
                        bar.write(f"  {row['model']:<26} batch {batch:>3}  {row['impl']:<34} "
                                  f"{1e3 * row['median_s']:9.1f} ms  {row['images_per_s']:8.2f} img/s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(device=described, dtype=args.dtype, size=args.size, batches=batches,
                                        repeat=repeat, torchvision=note or None, rows=rows), indent=1))
        print(f"written: {path}")
    return 0


_SEGMENT_DESCRIPTION = """\
Segment photos with a DeepLab model. Per image, OUT/<stem>.png holds the labels as a palette PNG (PASCAL VOC
colours) and OUT/<stem>_overlay.png the colours blended over the photo; the per-image time is printed, split
into network and CRF. Folders are expanded to their images (with a progress bar), and images of one size are
batched. The input is normalised as the weights expect (their transforms(): ImageNet mean/std for torchvision's
weights, Caffe BGR mean subtraction for the Caffe-converted v1/v2 weights; a file that is not registered gets
the model's default, ImageNet for v3 and Caffe for v1/v2)."""


def add_parsers(sub) -> None:
    """Adds the ``segment`` and ``bench`` commands to the ``deeplab-fast`` parser."""
    seg = sub.add_parser("segment", help="segment photos with a DeepLab model (palette PNG + overlay per image)",
                         description=_SEGMENT_DESCRIPTION + "\n\n" + weights_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         parents=[threads_parent(), device_parent(),
                                  crf_preset_parent("refine with the dense CRF (default: no CRF)")])
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="photos (RGB) or folders of photos")
    seg.add_argument("--model", default="deeplab_v3_resnet101", metavar="NAME", choices=model_names(),
                     help="the architecture (default %(default)s): " + ", ".join(model_names()))
    seg.add_argument("--weights", metavar="NAME|FILE|URL", default=None,
                     help="the weights (required; see below)")
    seg.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                     help="classes (default: the weights')")
    seg.add_argument("--out", metavar="DIR", default="segment_out", help="output folder (default %(default)s)")
    seg.add_argument("--batch", type=positive_int, default=None, metavar="N",
                     help="images of one size per network call (default 8 on CUDA, 1 on the CPU)")
    seg.add_argument("--no-optimize", dest="optimize", action="store_false",
                     help="run the model as built, without deeplab_fast.optimize")
    seg.set_defaults(run=run_segment)

    bench = sub.add_parser("bench", help="images/s of the DeepLab models: ours, plain torch, torchvision",
                           description="Measure images/s of each model: deeplab_fast.optimize(model), the same "
                                       "architecture in plain torch, torchvision's model where it has one, and "
                                       "the v2 network with the dense CRF end to end. Prints a table naming "
                                       "the device; --json writes it.",
                           parents=[threads_parent(), device_parent()])
    bench.add_argument("--models", nargs="+", metavar="NAME", default=None, choices=model_names(),
                       help="models to measure (default: all): " + ", ".join(model_names()))
    bench.add_argument("--size", type=positive_int, default=513, metavar="PX", help="input side (default 513)")
    bench.add_argument("--batch", type=positive_int, nargs="+", default=None, metavar="N",
                       help="batch sizes (default: 1 on the CPU, about a minute per model on 2 cores; 1 16 on "
                            "CUDA). --batch 1 16 adds the batch-16 rows on the CPU (about 10 minutes per model)")
    bench.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="default: bf16 on CUDA (channels_last), fp32 on the CPU")
    bench.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                       help="timed calls per row, after one warm-up call (default 3 on the CPU, 10 on CUDA)")
    bench.add_argument("--no-crf", action="store_true", help="skip the v2 + dense CRF row")
    bench.add_argument("--json", metavar="FILE", default=None, help="write the rows as JSON")
    bench.set_defaults(run=run_bench)
