"""``deeplab-fast segment`` and ``deeplab-fast bench``: the DeepLab models from the command line.

    deeplab-fast segment IMAGE... --weights NAME|FILE|URL [--model NAME] [--crf PRESET] [--out DIR]
    deeplab-fast bench [--models NAME...] [--size 513] [--batch 1 [16]] [--device cpu|cuda] [--json FILE]

``segment`` writes, per image, ``<stem>.png`` (the labels as a palette PNG, PASCAL VOC colours) and
``<stem>_overlay.png`` (the colours blended over the photo) into ``--out``, and prints the per-image time split
into network and CRF. Folders are expanded to their images, with a progress bar; images of one size are batched
(``--batch``, default 8 on CUDA, 1 on the CPU). ``--weights`` is what ``deeplab_fast.models.get_model`` takes:
a registered weights name, a checkpoint file or a URL; a ``deeplab-fast train`` checkpoint also gives the model,
its options, the class count and the preprocessing (as ``eval`` reads them); the input is normalised as the
weights say. Two inputs that would write the same output are refused before anything is written; an image that
cannot be read (or segmented) is reported and skipped, and the command then exits 1.

Under ``torchrun`` every process runs the checks and loads the model, then segments every N-th network call of the
list (the calls are decided from the image headers first, so the files equal one process's); rank 0 prints the
summary of all of them, and every process exits 1 if an image failed in any.

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
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import benchmark, models, optimize
from ..benchmark import bench_forms, bench_rows, device_name, logits_of
from ..data.voc import colorize, voc_palette
from ..io import IMAGE_EXTS, image_size, list_images, load_photo, save_image, save_palette_png
from ..models import SegmentationPreset
from ..nn import DenseCRF
from ._common import (EXIT_FAILED, CLIError, add_preprocessing_option, crf_preset_parent, device_parent,
                      error_line, library_errors, load_model_from_options, model_names, model_options_parent,
                      positive_int, resolve_device, threads_parent, working_on, write_line)
from ._torchrun import torchrun_shard

__all__ = ["add_parsers", "run_segment", "run_bench", "weights_help"]

DEFAULT_MODEL = "deeplab_v3_resnet101"


def weights_help() -> str:
    """What ``--weights`` takes, with the registered names of every model."""
    lines = ["--weights takes a registered weights name, a checkpoint file or an http(s):// / file:// URL "
             "(downloads go to torch.hub's cache). Registered:"]
    for name in models.list_models():
        members = ", ".join(k for k, m in models.get_model_weights(name).__members__.items() if not m.backbone_only)
        lines.append(f"  {name}: {members or 'none (backbone weights only, for train --init)'}")
    lines.append("Files: torchvision's DeepLabV3 and mobile state dicts, kazuto1011/deeplab-pytorch's DeepLab-v2 "
                 "checkpoints (recognised by their released file names), segmentation_models_pytorch DeepLabV3Plus "
                 "state dicts (with --model-kwargs '{\"flavor\": \"smp\", \"output_stride\": 16}', or 8 as they "
                 "were trained), or a state dict saved from a deeplab_fast.models model "
                 "(OUT/last.pth of 'deeplab-fast train' too, whose model, options, classes and preprocessing are "
                 "read from it). The number of classes is read from the checkpoint unless --num-classes is given.")
    return "\n".join(lines)


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    """The image files of the IMAGE arguments (folders expanded to their images), each file once."""
    paths: list[Path] = []
    seen: set = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, IMAGE_EXTS)
            if not found:
                raise CLIError(f"IMAGE {item!r}: the folder has no images ({', '.join(IMAGE_EXTS)})")
        elif p.is_file():
            found = [p]
        else:
            raise CLIError(f"IMAGE {item!r}: no such file or folder")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                paths.append(f)
    return paths


def _outputs(paths: Sequence[Path], out_dir: Path) -> dict:
    """``{input: (labels path, overlay path)}`` in ``out_dir``. CLIError when two inputs would write one file (one
    name in two folders, ``x.png`` and ``x.jpg``, ``x.png`` and ``x_overlay.png``) or an output is an input."""
    outputs, writer = {}, {}
    inputs = {p.resolve() for p in paths}
    for p in paths:
        pair = (out_dir / f"{p.stem}.png", out_dir / f"{p.stem}_overlay.png")
        for out in pair:
            other = writer.setdefault(out.name, p)
            if other is not p:
                raise CLIError(f"IMAGE {str(other)!r} and {str(p)!r} would both be written as {str(out)!r}; "
                               "rename one, or segment them into separate --out folders")
            if out.resolve() in inputs:
                raise CLIError(f"output {str(out)!r} is one of the input images; refusing to overwrite an input "
                               "(choose another --out)")
        outputs[p] = pair
    return outputs


def _batches(paths: Sequence[Path], batch: int) -> list[list[Path]]:
    """The network calls: runs of up to ``batch`` consecutive images of one size (read from the headers), decided
    before any image is segmented, so that every process of a torchrun run batches its images as one process
    would. A file whose header cannot be read joins the current call without counting (reading it fails and is
    reported)."""
    batches: list[list[Path]] = [[]]
    size, count = None, 0
    for path in paths:
        try:
            shape = image_size(path)
        except (OSError, ValueError):
            shape = None
        if shape is not None:
            if count == batch or (count and shape != size):
                batches.append([])
                count = 0
            size, count = shape, count + 1
        batches[-1].append(path)
    return [b for b in batches if b]


def _read(paths: Sequence[Path], failed: list) -> Iterator[list]:
    """The photos of one network call, ``[(path, [H, W, 3] uint8)]``, per run of one size; an image that cannot
    be read is reported and added to ``failed``."""
    group: list = []
    for path in paths:
        try:
            with library_errors(), working_on(f"IMAGE {str(path)!r}"):
                photo = load_photo(path, "IMAGE")
        except CLIError as exc:
            failed.append(path)
            write_line(error_line("segment", str(exc)), sys.stderr)
            continue
        if group and group[0][1].shape != photo.shape:
            yield group
            group = []
        group.append((path, photo))
    if group:
        yield group


def _segment(model, preprocess, crf, images: np.ndarray, device: torch.device):
    """(labels [B, H, W] uint8, network seconds per image, CRF seconds per image) for a batch of photos."""
    x = preprocess(images).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = logits_of(model(x))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_net = (time.perf_counter() - t0) / len(images)
    t_crf = 0.0
    if crf is not None:
        t1 = time.perf_counter()
        probs = crf(logits, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_crf = (time.perf_counter() - t1) / len(images)
        logits = probs
    return logits.argmax(1).cpu().numpy().astype(np.uint8), t_net, t_crf


def _prepare(args):
    """The checks and the model, before anything is written: (images, their outputs, device, model,
    preprocessing, CRF, batch)."""
    if args.weights is None:
        raise CLIError(f"--weights is required: segmentation needs trained weights.\n{weights_help()}")
    paths = _collect_images(args.images)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {args.out!r} is a file, not a folder")
    outputs = _outputs(paths, out_dir)
    device = resolve_device(args.device)
    _, model, preprocessing, _ = load_model_from_options(args, default_model=DEFAULT_MODEL)
    if args.optimize:
        model = optimize(model, inplace=True)
    model = model.to(device)
    crf = DenseCRF.from_preset(args.crf) if args.crf else None
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (8 if device.type == "cuda" else 1)
    return paths, outputs, device, model, SegmentationPreset(preprocessing), crf, batch


def run_segment(args) -> int:
    with torchrun_shard(args.device) as shard:
        paths, outputs, device, model, preprocess, crf, batch = shard.agreed(lambda: _prepare(args))
        mine = shard.take(_batches(paths, batch))
        failed: list[Path] = []
        done, totals, palette = 0, [0.0, 0.0], voc_palette()
        bar = tqdm(total=sum(map(len, mine)), unit="img",
                   disable=not shard.main or len(paths) < 2 or not sys.stderr.isatty())
        for group in (g for call in mine for g in _read(call, failed)):
            names = ", ".join(repr(str(p)) for p, _ in group)
            try:
                with library_errors(code=EXIT_FAILED), working_on(f"IMAGE {names}"):
                    labels, t_net, t_crf = _segment(model, preprocess, crf, np.stack([a for _, a in group]), device)
                    for (path, photo), lab in zip(group, labels):
                        colours = colorize(lab).astype(np.float32)
                        overlay = (0.5 * photo.astype(np.float32) + 0.5 * colours).round().astype(np.uint8)
                        save_palette_png(lab, palette, outputs[path][0])
                        save_image(overlay, outputs[path][1], "overlay")
                        present = ", ".join(str(int(v)) for v in np.unique(lab))
                        write_line(f"{path.name}: {photo.shape[1]}x{photo.shape[0]}, network {1e3 * t_net:.1f} ms"
                                   + (f", CRF {1e3 * t_crf:.1f} ms" if crf is not None else "")
                                   + f"; labels {present}")
            except CLIError as exc:
                failed += [p for p, _ in group]
                write_line(error_line("segment", str(exc)), sys.stderr)
                bar.update(len(group))
                continue
            done += len(group)
            totals[0] += t_net * len(group)
            totals[1] += t_crf * len(group)
            bar.update(len(group))
        bar.close()
        index = {p: i for i, p in enumerate(paths)}
        results = shard.gather((done, totals, [index[p] for p in failed]))
    done = sum(r[0] for r in results)
    totals = [sum(r[1][k] for r in results) for k in (0, 1)]
    failed = [paths[i] for i in sorted(i for r in results for i in r[2])]
    if shard.main:
        per_image = (f": network {1e3 * totals[0] / done:.1f} ms/image"
                     + (f", CRF {1e3 * totals[1] / done:.1f} ms/image" if crf is not None else "")) if done else ""
        where = f"{device}" if shard.world == 1 else f"{shard.world} processes ({device.type})"
        print(f"{done} image(s) on {where}{per_image}; written to {Path(args.out)}"
              + (f"; {len(failed)} failed: {', '.join(p.name for p in failed)}" if failed else ""))
    return EXIT_FAILED if failed else 0


def run_bench(args) -> int:
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
    tv, note = benchmark.load_torchvision()
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
weights, Caffe BGR mean subtraction for the Caffe-converted v1/v2 weights; a 'deeplab-fast train' checkpoint as
it was trained, and gives the model, its options and classes too; another file gets the model's default, ImageNet
for v3 and Caffe for v1/v2). Two inputs whose outputs would have one name are refused before anything is written;
an image that cannot be read is reported and skipped. Under torchrun ('torchrun --nproc_per_node N -m
deeplab_fast segment ...') the processes share the images and write the same files as one process; rank 0
prints the summary.

exit codes: 0 success; 1 some images failed (the others were written), an unreadable checkpoint or a failed
download, out of memory; 2 bad arguments or input; 130 interrupted."""


def add_parsers(sub) -> None:
    """Adds the ``segment`` and ``bench`` commands to the ``deeplab-fast`` parser."""
    seg = sub.add_parser("segment", help="segment photos with a DeepLab model (palette PNG + overlay per image)",
                         description=_SEGMENT_DESCRIPTION + "\n\n" + weights_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         parents=[threads_parent(), device_parent(), model_options_parent(),
                                  crf_preset_parent("refine with the dense CRF (default: no CRF)")])
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="photos (RGB) or folders of photos")
    seg.add_argument("--model", default=None, metavar="NAME", choices=model_names(),
                     help=f"the architecture (default: the one a training checkpoint names, else {DEFAULT_MODEL}): "
                          + ", ".join(model_names()))
    seg.add_argument("--weights", metavar="NAME|FILE|URL", default=None,
                     help="the weights (required; see below)")
    seg.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                     help="classes (default: the weights')")
    add_preprocessing_option(seg, "input normalisation (default: the training checkpoint's, else the weights')")
    seg.add_argument("--out", metavar="DIR", default="segment_out", help="output folder (default %(default)s)")
    seg.add_argument("--batch", type=positive_int, default=None, metavar="N",
                     help="images of one size per network call (default 8 on CUDA, 1 on the CPU)")
    seg.add_argument("--no-optimize", dest="optimize", action="store_false",
                     help="run the model as built, without deeplab_fast.optimize")
    seg.set_defaults(run=run_segment)

    bench = sub.add_parser("bench", help="images/s of the DeepLab models: ours, plain torch, torchvision, smp",
                           description="Measure images/s of each model: deeplab_fast.optimize(model), the same "
                                       "architecture in plain torch, torchvision's model where it has one (v3 "
                                       "ResNets, the mobile models), for the v3+ models our smp flavor beside "
                                       "segmentation_models_pytorch's DeepLabV3Plus (at the side rounded down to "
                                       "a multiple of 16, which smp needs) when smp is installed, and the "
                                       "network with the dense CRF end to end where its weights name a CRF preset "
                                       "(v2). Prints a table naming the device; --json writes it.",
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
    bench.add_argument("--no-crf", action="store_true", help="skip the network + dense CRF row (v2)")
    bench.add_argument("--json", metavar="FILE", default=None, help="write the rows as JSON")
    bench.set_defaults(run=run_bench)
