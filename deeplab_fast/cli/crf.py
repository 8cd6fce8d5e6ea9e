"""``deeplab-fast crf`` and ``deeplab-fast demo``: refining coarse annotations with the dense CRF.

``crf`` reproduces pydensecrf's ``examples/inference.py`` (its generic ``DenseCRF`` branch) pixel for pixel; the
refinement itself is :func:`deeplab_fast.densecrf.refine.refine_annotation` (see there for the model), the image
input / output :mod:`deeplab_fast.io`. Every distinct colour of ANNO is a label, pure black means "unknown" (as do
fully transparent pixels); a 16-bit greyscale ANNO is decoded by value (0 unknown) and the result written as
16-bit values. 16-bit greyscale photos are scaled to 8 bits by value.

Folder mode runs under ``torchrun`` too: every process pairs the images and runs the checks, then refines every
N-th pair; rank 0 prints the summary of all of them, and every process exits 1 if a pair failed in any.

Exit codes: 0 success; 1 in folder mode, some images failed (the others were written), or out of memory (the
message names the image); 2 bad arguments or input (missing file, size mismatch, fewer than 2 labels, an unusable
standard deviation, ...), with a message naming the argument; 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..densecrf.refine import CrfParams, RefineResult, make_overlay, refine_annotation, std_dev_problems
from ..io import ANNO_EXTS, IMAGE_EXTS, list_images, load_annotation, load_photo, same_file, save_image
from ._common import (CLIError, check_output_path, error_line, float32_std_dev, float32_weight, labels_limit,
                      library_errors, nonnegative_int, probability, threads_parent, warn, working_on,
                      write_line)
from ._torchrun import torchrun_shard

__all__ = ["add_parsers", "run_crf", "run_demo"]

DEMO_RESULT = "crf_demo_result.png"
DEMO_OVERLAY = "crf_demo_overlay.png"


def _size(arr) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def _label_summary(r: RefineResult) -> str:
    return f"{r.n_labels} labels" + (" + unknown" if r.has_unknown else "")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_std_devs(params: CrfParams, image, image_name: str) -> None:
    """CLIError naming the option and its usable range when a standard deviation cannot work on this image."""
    problems = std_dev_problems(params, image.shape[0], image.shape[1])
    if problems:
        field, value, usable = problems[0]
        raise CLIError(f"{_option(field)} {value:g} cannot be used on {image_name} ({_size(image)}): the scaled "
                       f"coordinates would leave the lattice's range; the usable range is {usable:.3g} to "
                       f"{float(np.finfo(np.float32).max):.3g}")


def _params(args) -> CrfParams:
    return CrfParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CrfParams)})


def _process_pair(image_path: Path, anno_path: Path, out_path: Path, overlay_path: Path | None,
                  params: CrfParams, *, image_name: str, anno_name: str) -> RefineResult:
    with library_errors(), working_on(f"{image_name} {str(image_path)!r}"):
        image = load_photo(image_path, image_name)
    with library_errors(), working_on(f"{anno_name} {str(anno_path)!r}"):
        anno = load_annotation(anno_path, anno_name)
    _check_std_devs(params, image, f"{image_name} {str(image_path)!r}")
    with library_errors(), working_on(f"{image_name} {str(image_path)!r} ({_size(image)})"):
        refined = refine_annotation(image, anno, params, image_name=f"{image_name} {str(image_path)!r}",
                                    anno_name=f"{anno_name} {str(anno_path)!r}")
        save_image(refined.result, out_path, "OUT")
        if overlay_path is not None:
            save_image(make_overlay(image, anno, refined.unknown, refined.result), overlay_path, "--overlay")
    return refined


def _run_crf_file(args, params: CrfParams) -> int:
    image_path, anno_path, out_path = Path(args.image), Path(args.anno), Path(args.out)
    if not image_path.exists():
        raise CLIError(f"IMAGE {args.image!r}: no such file")
    if not anno_path.exists():
        raise CLIError(f"ANNO {args.anno!r}: no such file")
    if anno_path.is_dir():
        raise CLIError(f"ANNO {args.anno!r} is a folder but IMAGE {args.image!r} is a file; give two files, "
                       "or two folders for folder mode")
    if out_path.is_dir():  # like cp: write into the folder
        out_path = out_path / (image_path.stem + ".png")
    overlay_path = Path(args.overlay) if args.overlay else None
    inputs = [image_path, anno_path]
    check_output_path(out_path, "OUT", inputs)
    if overlay_path is not None:
        check_output_path(overlay_path, "--overlay", inputs)
        if overlay_path.resolve() == out_path.resolve():
            raise CLIError(f"--overlay {args.overlay!r} is the same file as OUT")

    start = time.perf_counter()
    refined = _process_pair(image_path, anno_path, out_path, overlay_path, params,
                            image_name="IMAGE", anno_name="ANNO")
    total = time.perf_counter() - start
    print(f"{image_path.name}: {_size(refined.result)}, {_label_summary(refined)}, {params.iterations} "
          f"iterations -> {out_path}" + (f" (overlay: {overlay_path})" if overlay_path else ""))
    print(f"time: CRF {refined.crf_seconds:.3f} s, total {total:.3f} s (with image input/output)")
    return 0


def _names(paths: Sequence[Path], limit: int = 10) -> str:
    names = [p.name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _folder_pairs(args, report: bool) -> tuple:
    """Folder mode's checks and its (image, annotation) pairs, before anything is refined: (pairs, number of images,
    images without annotation, OUT folder, overlay folder or None). ``report``: print the warnings."""
    image_dir, anno_dir, out_dir = Path(args.image), Path(args.anno), Path(args.out)
    if not anno_dir.exists():
        raise CLIError(f"ANNO {args.anno!r}: no such folder")
    if not anno_dir.is_dir():
        raise CLIError(f"IMAGE {args.image!r} is a folder but ANNO {args.anno!r} is a file; give two folders "
                       "(folder mode) or two files")
    if same_file(image_dir, anno_dir):
        raise CLIError(f"IMAGE and ANNO are the same folder {args.image!r}; keep the annotations in a folder "
                       "of their own (matched to the images by file name without extension)")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"OUT {args.out!r} is a file, but in folder mode OUT must be a folder")
    for name, folder in (("IMAGE", image_dir), ("ANNO", anno_dir)):
        if same_file(out_dir, folder):
            raise CLIError(f"OUT {args.out!r} is the {name} folder; write the results to another folder")
    overlay_dir = Path(args.overlay) if args.overlay else None
    if overlay_dir is not None:
        if overlay_dir.exists() and not overlay_dir.is_dir():
            raise CLIError(f"--overlay {args.overlay!r} is a file, but in folder mode it must be a folder")
        for name, folder in (("IMAGE", image_dir), ("ANNO", anno_dir), ("OUT", out_dir)):
            if same_file(overlay_dir, folder) or overlay_dir.resolve() == folder.resolve():
                raise CLIError(f"--overlay {args.overlay!r} is the {name} folder; use a folder of its own")

    images = list_images(image_dir, IMAGE_EXTS)
    if not images:
        raise CLIError(f"IMAGE folder {args.image!r} has no images ({', '.join(IMAGE_EXTS)})")
    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = {stem: ps for stem, ps in by_stem.items() if len(ps) > 1}
    if clashes:
        detail = "; ".join(f"{_names(ps)}" for ps in clashes.values())
        raise CLIError(f"IMAGE folder {args.image!r} has several images with the same name, whose results "
                       f"would overwrite each other as OUT/<name>.png: {detail}")
    annos: dict[str, list[Path]] = {}
    for p in list_images(anno_dir, ANNO_EXTS):
        annos.setdefault(p.stem, []).append(p)

    pairs, missing = [], []
    for image in images:
        candidates = sorted(annos.get(image.stem, []), key=lambda p: ANNO_EXTS.index(p.suffix.lower()))
        if not candidates:
            missing.append(image)
            continue
        if len(candidates) > 1 and report:
            warn(f"several annotations for {image.name}: {_names(candidates)}; using {candidates[0].name}")
        pairs.append((image, candidates[0]))
    if missing and report:
        warn(f"no annotation in ANNO folder {args.anno!r} for {len(missing)} of {len(images)} images, "
              f"skipped: {_names(missing)} (an annotation has the image's name with a "
              f"{'/'.join(e.lstrip('.') for e in ANNO_EXTS)} extension)")
    if not pairs:
        raise CLIError(f"no image of IMAGE folder {args.image!r} has an annotation in ANNO folder {args.anno!r} "
                       "(matched by file name without extension)")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overlay_dir is not None:
            overlay_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output folder: {exc}") from None

    return pairs, len(images), missing, out_dir, overlay_dir


def _run_crf_folder(args, params: CrfParams) -> int:
    with torchrun_shard("cpu") as shard:
        pairs, n_images, missing, out_dir, overlay_dir = shard.agreed(lambda: _folder_pairs(args, shard.main))
        start = time.perf_counter()
        crf_seconds = 0.0
        failed: list[int] = []
        mine = shard.take(list(enumerate(pairs)))
        with tqdm(mine, desc="crf", unit="image", file=sys.stderr, dynamic_ncols=True,
                  disable=not shard.main) as bar:
            for k, (image, anno) in bar:
                bar.set_postfix_str(image.name, refresh=False)
                try:
                    refined = _process_pair(image, anno, out_dir / (image.stem + ".png"),
                                            overlay_dir / (image.stem + ".png") if overlay_dir else None, params,
                                            image_name="image", anno_name="annotation")
                except CLIError as exc:
                    failed.append(k)
                    write_line(error_line("crf", str(exc)), sys.stderr)
                    continue
                crf_seconds += refined.crf_seconds
        results = shard.gather((failed, crf_seconds))
    failed_images = [pairs[k][0] for k in sorted(k for r in results for k in r[0])]
    crf_seconds = sum(r[1] for r in results)
    total = time.perf_counter() - start
    done = len(pairs) - len(failed_images)
    if shard.main:
        print(f"refined {done} of {n_images} images into {str(out_dir)!r}"
              + (f"; {len(missing)} without annotation" if missing else "")
              + (f"; {len(failed_images)} failed: {_names(failed_images)}" if failed_images else ""))
        print(f"time: CRF {crf_seconds:.3f} s, total {total:.3f} s (with image input/output)"
              + (f", {total / done:.3f} s per image" if done else "")
              + ("" if shard.world == 1 else f", {shard.world} processes"))
    return 1 if failed_images else 0


def run_crf(args) -> int:
    params = _params(args)
    if Path(args.image).is_dir():
        return _run_crf_folder(args, params)
    return _run_crf_file(args, params)


def run_demo(args) -> int:
    params = CrfParams()
    assets = resources.files("deeplab_fast.assets")
    start = time.perf_counter()
    try:
        with resources.as_file(assets / "example.png") as photo_file, \
                resources.as_file(assets / "example_anno.png") as anno_file:
            image = load_photo(Path(photo_file), "bundled example photo")
            anno = load_annotation(Path(anno_file), "bundled example annotation")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise CLIError(f"the bundled example images are missing ({exc}); reinstall deeplab_fast") from None
    out, overlay = Path.cwd() / DEMO_RESULT, Path.cwd() / DEMO_OVERLAY
    with library_errors():
        refined = refine_annotation(image, anno, params)
        save_image(refined.result, out, "the demo result")
        save_image(make_overlay(image, anno, refined.unknown, refined.result), overlay, "the demo overlay")
    total = time.perf_counter() - start
    print(f"refined the bundled example photo ({_size(image)}, {_label_summary(refined)}, "
          f"{params.iterations} iterations)")
    print(f"wrote {out}")
    print(f"wrote {overlay} (photo | coarse annotation | refined result)")
    print(f"time: CRF {refined.crf_seconds:.3f} s, total {total:.3f} s (with image input/output)")
    return 0


_CRF_DESCRIPTION = """\
Refine a coarse colour annotation ANNO of the photo IMAGE with a fully connected (dense) CRF and write
the refined labelling to OUT, an RGB image of the photo's size (use .png). Reproduces pydensecrf's
examples/inference.py pixel for pixel.

Every distinct colour of ANNO is a label; pure black (0,0,0) means "unknown" (fully transparent pixels
too). If ANNO has no black pixel at all, every colour is a label and none is unknown (zero_unsure=False);
old versions of the pydensecrf example always used zero_unsure=True, which mislabels such annotations.
A 16-bit greyscale ANNO is decoded by value instead (every value a label, 0 unknown) and OUT written as
16-bit values. The CRF has a Gaussian smoothness term on the pixel positions (y, x) and a bilateral appearance term on
(y, x, r, g, b), both with symmetric normalisation and Potts compatibilities.

Folder mode: if IMAGE and ANNO are folders, every image in IMAGE (not in its subfolders) whose annotation
has the same name (without extension; .png, .jpg, ...) in ANNO is refined into OUT/<name>.png; OUT (and
--overlay) are created as needed, and images without annotation are listed and skipped. Under torchrun
('torchrun --nproc_per_node N -m deeplab_fast crf IMAGES/ ANNOS/ OUT/') the processes share the images and
write the same files as one process; rank 0 prints the summary."""

# The CRF options: CrfParams field, argument type, metavar, help.
_CRF_OPTIONS = (
    ("gt_prob", probability, "P", "probability that an annotated pixel's colour is right, in (0, 1)"),
    ("gaussian_sxy", float32_std_dev, "PX", "spatial std. dev. of the smoothness term, pixels"),
    ("gaussian_compat", float32_weight, "W", "weight (Potts compatibility) of the smoothness term"),
    ("bilateral_sxy", float32_std_dev, "PX", "spatial std. dev. of the appearance term, pixels"),
    ("bilateral_srgb", float32_std_dev, "I", "colour std. dev. of the appearance term, 8-bit levels"),
    ("bilateral_compat", float32_weight, "W", "weight (Potts compatibility) of the appearance term"),
    ("iterations", nonnegative_int, "N", "mean-field iterations"),
)

_EPILOG = """\
exit codes: 0 success; 1 some images of a folder failed (the others were written); 2 bad arguments or
input (message names the argument); 130 interrupted."""


def add_parsers(sub) -> None:
    """Adds the ``crf`` and ``demo`` commands to the ``deeplab-fast`` parser."""
    crf = sub.add_parser("crf", help="refine a coarse colour annotation of a photo (or a folder of them)",
                         description=_CRF_DESCRIPTION, epilog=_EPILOG, parents=[threads_parent()],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    crf.add_argument("image", metavar="IMAGE", help="the photo (RGB), or a folder of photos")
    crf.add_argument("anno", metavar="ANNO", help="its coarse colour annotation, or a folder of them")
    crf.add_argument("out", metavar="OUT", help="where to write the result (.png), or a folder in folder mode")
    d = CrfParams()
    g = crf.add_argument_group("CRF parameters (defaults: pydensecrf's example)")
    for field, kind, metavar, text in _CRF_OPTIONS:
        g.add_argument(_option(field), type=kind, default=getattr(d, field), metavar=metavar,
                       help=f"{text} (default %(default)s)")
    o = crf.add_argument_group("other options")
    o.add_argument("--overlay", metavar="PATH", default=None,
                   help="also write a side-by-side image: photo | annotation over photo | result over photo "
                        "(a folder in folder mode)")
    o.add_argument("--max-labels", type=labels_limit, default=d.max_labels, metavar="N",
                   help="refuse annotations with more colours than this, a sign of a lossy or anti-aliased "
                        "annotation (default %(default)s)")
    crf.set_defaults(run=run_crf)

    demo = sub.add_parser("demo", help="refine the bundled example photo; writes crf_demo_result.png and "
                                       "crf_demo_overlay.png into the current folder",
                          description=f"Refine the bundled example photo (from pydensecrf's examples, MIT "
                                      f"licence) with its coarse annotation, and write {DEMO_RESULT} and "
                                      f"{DEMO_OVERLAY} (photo | annotation | result) into the current "
                                      f"folder.")
    demo.set_defaults(run=run_demo)
