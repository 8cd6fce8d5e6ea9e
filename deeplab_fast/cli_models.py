"""``deeplab-fast segment`` and ``deeplab-fast bench``: the DeepLab models from the command line.

    deeplab-fast segment IMAGE... --model deeplab_v3_resnet101 --weights FILE [--crf PRESET] [--out DIR]
    deeplab-fast bench [--models NAME...] [--size 513] [--batch 1 16] [--device cpu|cuda] [--json FILE]

``segment`` writes, per image, ``<stem>.png`` (the labels as a palette PNG, PASCAL VOC colours) and
``<stem>_overlay.png`` (the colours blended over the photo) into ``--out``, and prints the per-image time split
into network and CRF. Folders are expanded to their images, with a progress bar; images of one size are batched
(``--batch``, default 8 on CUDA, 1 on the CPU). Nothing is downloaded: ``--weights`` names a checkpoint file.

``bench`` measures images/s of each model in three forms on the same input: ``deeplab_fast.optimize(model)``,
the same architecture in plain torch (the model as built, ``optimize`` off), and torchvision's model where
torchvision has one (DeepLabV3 ResNet-50/101) and can be imported; plus the DeepLab-v2 network with the dense
CRF end to end. It prints a table naming the device and writes JSON.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .cli import IMAGE_EXTS, CLIError, _check_output_path, _list_images, _positive_int, _save_image
from .data.voc import voc_palette

__all__ = ["voc_palette", "colorize", "preprocess", "load_model", "WEIGHTS_HELP"]

WEIGHTS_HELP = """\
--weights names a checkpoint file (nothing is downloaded). These load:
  - torchvision's DeepLabV3 state dicts, e.g. deeplabv3_resnet101_coco-586e9e4e.pth or
    deeplabv3_resnet50_coco-cd0a2569.pth (from torchvision's model zoo), with --model deeplab_v3_resnet101 or
    deeplab_v3_resnet50 (the torchvision head; aux_classifier is accepted and unused);
  - kazuto1011/deeplab-pytorch's DeepLab-v2 checkpoints converted from Caffe, e.g.
    deeplabv2_resnet101_msc-vocaug-20000.pth, with --model deeplab_v2_resnet101 (converted automatically);
  - a state dict saved from a deeplab_fast.models model (torch.save(model.state_dict(), path)).
The number of classes is read from the checkpoint unless --num-classes is given."""


def colorize(labels: np.ndarray) -> np.ndarray:
    """[H, W] integer labels -> [H, W, 3] uint8 VOC colours."""
    return voc_palette()[labels.astype(np.int64) % 256]


def preprocess(images: np.ndarray, model_name: str):
    """[B, H, W, 3] uint8 RGB -> the model's input Tensor[B, 3, H, W] float32: ImageNet normalisation for the v3
    models (torchvision's weights), Caffe BGR mean subtraction (0-255) for the v1 / v2 models
    (``deeplab_fast.data.transforms.normalize``)."""
    import torch

    from .data.transforms import normalize

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2)  # a writable copy
    return normalize(x, "torchvision" if model_name.startswith("deeplab_v3") else "caffe")


def _num_classes(state: dict) -> int | None:
    for key in ("classifier.4.weight", "classifier.1.weight", "fc8.weight", "aspp.c0.weight", "head.1.weight"):
        if key in state and hasattr(state[key], "shape"):
            return int(state[key].shape[0])
    for key, value in state.items():  # kazuto1011's v2 head
        if key.endswith("aspp.c0.weight"):
            return int(value.shape[0])
    return None


def load_model(name: str, weights: str, num_classes: int | None = None):
    """Builds ``name`` and loads the checkpoint ``weights`` (strict). Returns the model in eval mode.
    Raises CLIError for an unknown model, a missing or unreadable file, or weights of another architecture."""
    from . import models

    if name not in models.MODELS:
        raise CLIError(f"--model {name!r}: unknown; choose one of {', '.join(sorted(models.MODELS))}")
    try:
        state = models.load_checkpoint(weights)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        raise CLIError(f"--weights {weights!r}: {exc}") from None
    if models.is_kazuto_deeplabv2(state):
        state = models.convert_kazuto_deeplabv2(state)
    classes = num_classes or _num_classes(state)
    if classes is None:
        raise CLIError(f"--weights {weights!r}: cannot tell the number of classes from the checkpoint; give "
                       f"--num-classes")
    kwargs = {"num_classes": classes}
    if name.startswith("deeplab_v3") and any(k.startswith("aux_classifier.") for k in state):
        kwargs["aux_loss"] = True
    model = models.get_model(name, **kwargs)
    try:
        models.load_weights(model, state, strict=True)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(f"--weights {weights!r} does not fit --model {name}: {first}\n{WEIGHTS_HELP}") from None
    return model.eval()


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _list_images(p, IMAGE_EXTS)
            if not found:
                raise CLIError(f"IMAGE {item!r}: the folder has no images ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise CLIError(f"IMAGE {item!r}: no such file or folder")
    return paths


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _logits(out):
    return out["out"] if isinstance(out, dict) else out


def run_segment(args) -> int:
    import torch
    from tqdm import tqdm

    from .cli import load_photo
    from .nn import PRESETS, DenseCRF

    if args.weights is None:
        raise CLIError(f"--weights is required: segmentation needs trained weights.\n{WEIGHTS_HELP}")
    if args.crf is not None and args.crf not in PRESETS:
        raise CLIError(f"--crf {args.crf!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    paths = _collect_images(args.images)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {args.out!r} is a file, not a folder")
    device = _device(args.device)
    model = load_model(args.model, args.weights, args.num_classes)
    if args.optimize:
        from . import optimize
        model = optimize(model, inplace=True)
    model = model.to(device)
    crf = DenseCRF.from_preset(args.crf) if args.crf else None
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (8 if device.type == "cuda" else 1)

    # Group consecutive images of one size into batches.
    photos = [(p, load_photo(p, "IMAGE")) for p in paths]
    for p, _ in photos:
        for suffix in (".png", "_overlay.png"):
            _check_output_path(out_dir / f"{p.stem}{suffix}", "output", paths)
    groups: list[list] = []
    for item in photos:
        if groups and len(groups[-1]) < batch and groups[-1][0][1].shape == item[1].shape:
            groups[-1].append(item)
        else:
            groups.append([item])

    bar = tqdm(total=len(photos), unit="img", disable=len(photos) < 2 or not sys.stderr.isatty())
    totals = [0.0, 0.0]
    for group in groups:
        images = np.stack([a for _, a in group])
        x = preprocess(images, args.model).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = _logits(model(x))
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
            _save_palette(lab, out_dir / f"{path.stem}.png")
            overlay = (0.5 * photo.astype(np.float32) + 0.5 * colours.astype(np.float32)).round().astype(np.uint8)
            _save_image(overlay, out_dir / f"{path.stem}_overlay.png", "overlay")
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


def _save_palette(labels: np.ndarray, path: Path) -> None:
    """The labels as a palette ('P' mode) PNG with the VOC colours, written atomically."""
    import tempfile

    from PIL import Image

    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette().reshape(-1).tolist())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise CLIError(f"cannot write {str(path)!r}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------------
# bench


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def torchvision_model(name: str, num_classes: int):
    """torchvision's own model for ``name`` (DeepLabV3 ResNet-50/101, random weights), or None when torchvision
    has none or cannot be imported."""
    tv_builders = {"deeplab_v3_resnet50": "deeplabv3_resnet50", "deeplab_v3_resnet101": "deeplabv3_resnet101"}
    if name not in tv_builders:
        return None
    try:
        from torchvision.models import segmentation
    except Exception:  # noqa: BLE001 - torchvision is optional (and its C ops may not load on the CPU wheel)
        return None
    return getattr(segmentation, tv_builders[name])(weights=None, weights_backbone=None, num_classes=num_classes,
                                                   aux_loss=False)


def time_per_call(fn, device, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), synchronised (CUDA events on the GPU, wall clock on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def bench_rows(name: str, size: int, batch: int, device, dtype, repeat: int, crf: bool = False,
               num_classes: int = 21) -> list[dict]:
    """images/s of one model in its forms (ours = optimize(model), plain torch, torchvision) on one input, and
    for the v2 network the network + dense CRF end to end. Each row: impl, median_s, images_per_s."""
    import torch

    from . import models, optimize
    from .nn import DenseCRF

    torch.manual_seed(0)
    plain = models.get_model(name, num_classes=num_classes).eval()
    forms = {"deeplab_fast (optimize)": optimize(plain), "plain torch (same architecture)": plain}
    tv = torchvision_model(name, num_classes)
    if tv is not None:
        forms["torchvision"] = tv.eval()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    rows = []
    for impl, model in forms.items():
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        with torch.no_grad():
            times = time_per_call(lambda: model(x), device, repeat)
        med = statistics.median(times)
        rows.append(dict(model=name, impl=impl, size=size, batch=batch, median_s=med, images_per_s=batch / med))
    if crf and name.startswith("deeplab_v2"):
        model = forms["deeplab_fast (optimize)"]
        layer = DenseCRF.from_preset("deeplab_v2_voc")
        image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

        def end_to_end():
            return layer(_logits(model(x)).float(), image)

        with torch.no_grad():
            times = time_per_call(end_to_end, device, repeat)
        med = statistics.median(times)
        rows.append(dict(model=name, impl="deeplab_fast + dense CRF", size=size, batch=batch, median_s=med,
                         images_per_s=batch / med))
    return rows


def run_bench(args) -> int:
    import torch

    from . import models

    names = args.models or sorted(models.MODELS)
    for n in names:
        if n not in models.MODELS:
            raise CLIError(f"--models {n!r}: unknown; choose from {', '.join(sorted(models.MODELS))}")
    device = _device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if dtype == torch.bfloat16 and device.type != "cuda":
        raise CLIError("--dtype bf16 is for the GPU (--device cuda)")
    described = device_name(device)
    print(f"device: {described}; {args.dtype}, {args.size}x{args.size}, {args.repeat} timed calls per row")
    rows = []
    for name in names:
        for batch in args.batch:
            for row in bench_rows(name, args.size, batch, device, dtype, args.repeat, crf=not args.no_crf):
                rows.append(row)
                print(f"  {row['model']:<26} batch {batch:>3}  {row['impl']:<34} {1e3 * row['median_s']:9.1f} ms"
                      f"  {row['images_per_s']:8.2f} img/s", flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(device=described, dtype=args.dtype, size=args.size, rows=rows), indent=1))
        print(f"written: {path}")
    return 0


_SEGMENT_DESCRIPTION = """\
Segment photos with a DeepLab model. Per image, OUT/<stem>.png holds the labels as a palette PNG (PASCAL VOC
colours) and OUT/<stem>_overlay.png the colours blended over the photo; the per-image time is printed, split
into network and CRF. Folders are expanded to their images (with a progress bar), and images of one size are
batched. The input is normalised as the weights expect: ImageNet mean/std for the v3 models (torchvision's
weights), Caffe BGR mean subtraction for v1/v2."""


def add_parsers(sub) -> None:
    """Adds the ``segment`` and ``bench`` commands to the ``deeplab-fast`` parser."""
    import argparse

    seg = sub.add_parser("segment", help="segment photos with a DeepLab model (palette PNG + overlay per image)",
                         description=_SEGMENT_DESCRIPTION + "\n\n" + WEIGHTS_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="photos (RGB) or folders of photos")
    seg.add_argument("--model", default="deeplab_v3_resnet101", metavar="NAME",
                     help="the architecture (default %(default)s); see deeplab_fast.models.MODELS")
    seg.add_argument("--weights", metavar="FILE", default=None, help="the checkpoint (required; see below)")
    seg.add_argument("--num-classes", type=_positive_int, default=None, metavar="N",
                     help="classes (default: read from the checkpoint)")
    seg.add_argument("--crf", metavar="PRESET", default=None,
                     help="refine with the dense CRF: 'pydensecrf' or 'deeplab_v2_voc' (default: no CRF)")
    seg.add_argument("--out", metavar="DIR", default="segment_out", help="output folder (default %(default)s)")
    seg.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to run (default: cuda when available)")
    seg.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                     help="images of one size per network call (default 8 on CUDA, 1 on the CPU)")
    seg.add_argument("--no-optimize", dest="optimize", action="store_false",
                     help="run the model as built, without deeplab_fast.optimize")
    seg.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads")
    seg.set_defaults(run=run_segment)

    bench = sub.add_parser("bench", help="images/s of the DeepLab models: ours, plain torch, torchvision",
                           description="Measure images/s of each model: deeplab_fast.optimize(model), the same "
                                       "architecture in plain torch, torchvision's model where it has one, and "
                                       "the v2 network with the dense CRF end to end. Prints a table naming "
                                       "the device; --json writes it.")
    bench.add_argument("--models", nargs="+", metavar="NAME", default=None,
                       help="models to measure (default: all)")
    bench.add_argument("--size", type=_positive_int, default=513, metavar="PX", help="input side (default 513)")
    bench.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 16], metavar="N",
                       help="batch sizes (default 1 16)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="default: bf16 on CUDA (channels_last), fp32 on the CPU")
    bench.add_argument("--repeat", type=_positive_int, default=3, metavar="N", help="timed calls per row")
    bench.add_argument("--no-crf", action="store_true", help="skip the v2 + dense CRF row")
    bench.add_argument("--json", metavar="FILE", default=None, help="write the rows as JSON")
    bench.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads")
    bench.set_defaults(run=_run_bench_defaults)


def _run_bench_defaults(args) -> int:
    if args.dtype is None:
        args.dtype = "bf16" if _device(args.device).type == "cuda" else "fp32"
    return run_bench(args)
