"""``deeplab-fast``: the command-line tool of deeplab_fast.

Usage::

    deeplab-fast crf IMAGE ANNO OUT [options]     refine a coarse colour annotation of a photo
    deeplab-fast crf IMAGES/ ANNOS/ OUT/ [options] the same for every image of a folder
    deeplab-fast demo                              refine the bundled example photo
    deeplab-fast segment IMAGE... --weights FILE   segment photos with a DeepLab model (see cli_models.py)
    deeplab-fast bench                             images/s of the DeepLab models
    python -m deeplab_fast ...                     the same as ``deeplab-fast ...``

``crf`` reproduces pydensecrf's ``examples/inference.py`` (its generic ``DenseCRF`` branch) pixel for pixel:

* every distinct colour of the annotation ANNO is a label; pure black (0, 0, 0) means "unknown" (as do fully
  transparent pixels, when ANNO has an alpha channel);
* the unary trusts each annotated pixel with probability ``--gt-prob`` (``unary_from_labels``); unknown pixels
  get a uniform distribution. An annotation without any black pixel has no unknown label: every colour is a
  label (``zero_unsure=False``). Old versions of the pydensecrf example always passed ``zero_unsure=True``,
  which mislabels such annotations; this tool does not;
* two pairwise terms, both ``NORMALIZE_SYMMETRIC`` with Potts compatibilities: a Gaussian (smoothness) one on
  the pixel positions ``(y, x) / --gaussian-sxy``, and a bilateral (appearance) one on
  ``(y, x) / --bilateral-sxy`` and ``(r, g, b) / --bilateral-srgb``, in that feature order (the permutohedral
  lattice is not rotation invariant, so the order matters for exact reproduction);
* ``--iterations`` mean-field steps, then each pixel takes the colour of its most probable label. The result
  is an RGB image of the photo's size (write it as PNG: a lossy format would alter the colours).

Exit codes: 0 success; 1 in folder mode, some images failed (the others were written); 2 bad arguments or
input (missing file, size mismatch, fewer than 2 labels, ...), with a message naming the argument;
130 interrupted.

From Python, :func:`main` takes the argument list and returns the exit code, e.g.
``main(["crf", "im.png", "anno.png", "out.png", "--threads", "1"])``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["main", "CrfParams", "refine_annotation", "make_overlay"]

PROG = "deeplab-fast"

# File extensions (lower case) that folder mode takes as images, and as annotations in order of preference
# when one stem has several (lossless formats first).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
ANNO_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".webp", ".jpg", ".jpeg")
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")

DEMO_RESULT = "crf_demo_result.png"
DEMO_OVERLAY = "crf_demo_overlay.png"


class CLIError(Exception):
    """A user-facing error: printed as ``deeplab-fast CMD: error: MESSAGE``, no traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CrfParams:
    """The CRF settings of ``deeplab-fast crf``; the defaults are those of pydensecrf's example."""

    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 5
    max_labels: int = 256


@dataclass
class RefineResult:
    result: np.ndarray  # [H, W, 3] uint8, the refined colour labelling
    unknown: np.ndarray  # [H, W] bool, the annotation's unknown pixels
    n_labels: int
    has_unknown: bool
    crf_seconds: float


# ---------------------------------------------------------------------------------------------------------
# Argument types: argparse turns their ValueError/ArgumentTypeError into "argument --x: message", exit 2.


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text!r}")
    return value


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    return _int(text, 0)


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _labels_limit(text: str) -> int:
    return _int(text, 2)


# ---------------------------------------------------------------------------------------------------------
# Image input/output.


def _size(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise CLIError(f"{what} {str(path)!r}: no such file")
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder, expected an image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()  # detached from the file, which the with block closes
    except UnidentifiedImageError:
        raise CLIError(f"{what} {str(path)!r}: not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise CLIError(f"{what} {str(path)!r}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt files, unreadable files
        raise CLIError(f"{what} {str(path)!r}: cannot read it ({exc})") from None
    return image


def load_photo(path: Path, what: str = "IMAGE") -> np.ndarray:
    """The photo as a C-contiguous [H, W, 3] uint8 RGB array (alpha dropped, grey replicated)."""
    image = _open_image(path, what)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_annotation(path: Path, what: str = "ANNO") -> np.ndarray:
    """The annotation as [H, W, 3] uint8 RGB; fully transparent pixels become black (unknown)."""
    image = _open_image(path, what)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        rgb = np.array(rgba[..., :3])
        rgb[rgba[..., 3] == 0] = 0
        return rgb
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _check_output_path(path: Path, what: str, inputs: Sequence[Path]) -> None:
    from PIL import Image

    Image.init()
    ext = path.suffix.lower()
    if not ext:
        raise CLIError(f"{what} {str(path)!r} has no file extension; name it e.g. {path.name or 'out'}.png")
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise CLIError(f"{what} {str(path)!r}: unknown image format {path.suffix!r}; use .png")
    if fmt not in Image.SAVE:
        raise CLIError(f"{what} {str(path)!r}: Pillow cannot write {fmt} ({path.suffix}) images; use .png")
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"{what} {str(path)!r}: folder {str(parent)!r} does not exist")
    for src in inputs:
        if _same_file(path, src):
            raise CLIError(f"{what} {str(path)!r} is the same file as the input {str(src)!r}; "
                           "refusing to overwrite an input")
    if ext in LOSSY_EXTS:
        _warn(f"{what} {str(path)!r}: {path.suffix} is lossy, the label colours will not be exact; "
              "prefer .png")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _save_image(arr: np.ndarray, path: Path, what: str) -> None:
    """Write an RGB image atomically: to a temporary file beside ``path``, then renamed over it, so an
    interrupted run never leaves a truncated image behind."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format=fmt)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal new file's mode
        os.replace(tmp, path)
        tmp = None
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write {what} {str(path)!r}: {exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# The refinement itself.


def decode_annotation(anno_rgb: np.ndarray):
    """Colours to labels as pydensecrf's example does.

    Returns ``(labels [N] int64, colors [L] uint32 as 0xBBGGRR, has_unknown)``: with black present, label 0
    is unknown and labels 1..L index ``colors``; without, labels 0..L-1 index ``colors``.
    """
    anno = anno_rgb.astype(np.uint32)
    code = anno[..., 0] + (anno[..., 1] << 8) + (anno[..., 2] << 16)
    colors, labels = np.unique(code, return_inverse=True)
    labels = labels.reshape(-1)
    has_unknown = bool(colors[0] == 0)
    if has_unknown:
        colors = colors[1:]
    return labels, colors, has_unknown


def _colour_name(c: int) -> str:
    return f"#{c & 0xFF:02x}{(c >> 8) & 0xFF:02x}{(c >> 16) & 0xFF:02x}"


def refine_annotation(image: np.ndarray, anno_rgb: np.ndarray, params: CrfParams = CrfParams(),
                      *, image_name: str = "IMAGE", anno_name: str = "ANNO") -> RefineResult:
    """Refine a colour annotation ([H, W, 3] uint8) of ``image`` ([H, W, 3] uint8) with the dense CRF.

    Raises :class:`CLIError` for a size mismatch or an unusable annotation.
    """
    import torch

    from .densecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_labels
    from .ops.dense_crf import NORMALIZE_SYMMETRIC, dense_crf_features

    if anno_rgb.shape[:2] != image.shape[:2]:
        hint = ""
        if anno_rgb.shape[:2] == image.shape[1::-1]:
            hint = " (width and height are swapped: is one of them rotated, e.g. by an EXIF orientation tag?)"
        raise CLIError(f"{anno_name} is {_size(anno_rgb)} but {image_name} is {_size(image)}; the annotation "
                       f"must have the image's size{hint}")
    height, width = image.shape[:2]
    labels, colors, has_unknown = decode_annotation(anno_rgb)
    n_labels = len(colors)
    if n_labels < 2:
        found = ("only black (unknown) pixels" if n_labels == 0 else
                 f"a single label colour {_colour_name(int(colors[0]))}"
                 + (" besides black (unknown)" if has_unknown else ""))
        raise CLIError(f"{anno_name} needs at least 2 label colours (black means unknown), found {found}")
    if n_labels > params.max_labels:
        raise CLIError(f"{anno_name} has {n_labels} distinct colours, each of which would be a label (limit "
                       f"--max-labels {params.max_labels}); is it a lossy (JPEG) or anti-aliased image? Use a "
                       "PNG painted with flat colours, or raise --max-labels")

    start = time.perf_counter()
    unary = unary_from_labels(labels, n_labels, params.gt_prob, zero_unsure=has_unknown)
    gaussian = create_pairwise_gaussian(sdims=(params.gaussian_sxy, params.gaussian_sxy), shape=(height, width))
    bilateral = create_pairwise_bilateral(sdims=(params.bilateral_sxy, params.bilateral_sxy),
                                          schan=(params.bilateral_srgb,) * 3, img=image, chdim=2)

    def batch(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(0)

    try:
        q = dense_crf_features(batch(unary), [batch(gaussian), batch(bilateral)],
                               [params.gaussian_compat, params.bilateral_compat],
                               [NORMALIZE_SYMMETRIC, NORMALIZE_SYMMETRIC], iterations=params.iterations)
    except RuntimeError as exc:  # e.g. a tiny sxy/srgb pushing coordinates past the lattice's range
        raise CLIError(f"the dense CRF failed on {image_name}: {str(exc).splitlines()[0]} (options "
                       "--gaussian-sxy, --bilateral-sxy, --bilateral-srgb)") from None
    best = q[0].argmax(dim=0).numpy()
    crf_seconds = time.perf_counter() - start

    palette = np.stack([colors & 0xFF, (colors >> 8) & 0xFF, (colors >> 16) & 0xFF], axis=1).astype(np.uint8)
    result = palette[best].reshape(height, width, 3)
    unknown = (labels == 0).reshape(height, width) if has_unknown else np.zeros((height, width), dtype=bool)
    return RefineResult(result, unknown, n_labels, has_unknown, crf_seconds)


def _boundaries(rgb: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose colour differs from their right or lower neighbour."""
    edge = np.zeros(rgb.shape[:2], dtype=bool)
    edge[:, :-1] |= (rgb[:, :-1] != rgb[:, 1:]).any(axis=-1)
    edge[:-1, :] |= (rgb[:-1, :] != rgb[1:, :]).any(axis=-1)
    return edge


def make_overlay(image: np.ndarray, anno_rgb: np.ndarray, unknown: np.ndarray, result: np.ndarray,
                 alpha: float = 0.5) -> np.ndarray:
    """Side by side: the photo | the annotation over the photo | the result over the photo.

    Label colours are blended over the photo with weight ``alpha`` and the region borders drawn in white,
    so the refinement shows even with dark, similar label colours; unknown annotation pixels show the
    photo. Panels are separated by 4 white columns.
    """
    photo = image.astype(np.float32)

    def panel(colours: np.ndarray, keep_photo: np.ndarray | None = None) -> np.ndarray:
        out = np.clip(np.rint(photo * (1.0 - alpha) + colours.astype(np.float32) * alpha), 0, 255)
        out = out.astype(np.uint8)
        if keep_photo is not None:
            out[keep_photo] = image[keep_photo]
        out[_boundaries(colours)] = 255
        return out

    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([image, gap, panel(anno_rgb, unknown), gap, panel(result)],
                                               axis=1))


def _label_summary(r: RefineResult) -> str:
    return f"{r.n_labels} labels" + (" + unknown" if r.has_unknown else "")


# ---------------------------------------------------------------------------------------------------------
# Subcommands.


def _params(args) -> CrfParams:
    return CrfParams(gt_prob=args.gt_prob, gaussian_sxy=args.gaussian_sxy, gaussian_compat=args.gaussian_compat,
                     bilateral_sxy=args.bilateral_sxy, bilateral_srgb=args.bilateral_srgb,
                     bilateral_compat=args.bilateral_compat, iterations=args.iterations,
                     max_labels=args.max_labels)


def _process_pair(image_path: Path, anno_path: Path, out_path: Path, overlay_path: Path | None,
                  params: CrfParams, *, image_name: str, anno_name: str) -> RefineResult:
    image = load_photo(image_path, image_name)
    anno = load_annotation(anno_path, anno_name)
    refined = refine_annotation(image, anno, params, image_name=f"{image_name} {str(image_path)!r}",
                                anno_name=f"{anno_name} {str(anno_path)!r}")
    _save_image(refined.result, out_path, "OUT")
    if overlay_path is not None:
        _save_image(make_overlay(image, anno, refined.unknown, refined.result), overlay_path, "--overlay")
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
    _check_output_path(out_path, "OUT", inputs)
    if overlay_path is not None:
        _check_output_path(overlay_path, "--overlay", inputs)
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


def _list_images(folder: Path, exts: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def _names(paths: Sequence[Path], limit: int = 10) -> str:
    names = [p.name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _run_crf_folder(args, params: CrfParams) -> int:
    from tqdm import tqdm

    image_dir, anno_dir, out_dir = Path(args.image), Path(args.anno), Path(args.out)
    if not anno_dir.exists():
        raise CLIError(f"ANNO {args.anno!r}: no such folder")
    if not anno_dir.is_dir():
        raise CLIError(f"IMAGE {args.image!r} is a folder but ANNO {args.anno!r} is a file; give two folders "
                       "(folder mode) or two files")
    if _same_file(image_dir, anno_dir):
        raise CLIError(f"IMAGE and ANNO are the same folder {args.image!r}; keep the annotations in a folder "
                       "of their own (matched to the images by file name without extension)")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"OUT {args.out!r} is a file, but in folder mode OUT must be a folder")
    for name, folder in (("IMAGE", image_dir), ("ANNO", anno_dir)):
        if _same_file(out_dir, folder):
            raise CLIError(f"OUT {args.out!r} is the {name} folder; write the results to another folder")
    overlay_dir = Path(args.overlay) if args.overlay else None
    if overlay_dir is not None:
        if overlay_dir.exists() and not overlay_dir.is_dir():
            raise CLIError(f"--overlay {args.overlay!r} is a file, but in folder mode it must be a folder")
        for name, folder in (("IMAGE", image_dir), ("ANNO", anno_dir), ("OUT", out_dir)):
            if _same_file(overlay_dir, folder) or overlay_dir.resolve() == folder.resolve():
                raise CLIError(f"--overlay {args.overlay!r} is the {name} folder; use a folder of its own")

    images = _list_images(image_dir, IMAGE_EXTS)
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
    for p in _list_images(anno_dir, ANNO_EXTS):
        annos.setdefault(p.stem, []).append(p)

    pairs, missing = [], []
    for image in images:
        candidates = sorted(annos.get(image.stem, []), key=lambda p: ANNO_EXTS.index(p.suffix.lower()))
        if not candidates:
            missing.append(image)
            continue
        if len(candidates) > 1:
            _warn(f"several annotations for {image.name}: {_names(candidates)}; using {candidates[0].name}")
        pairs.append((image, candidates[0]))
    if missing:
        _warn(f"no annotation in ANNO folder {args.anno!r} for {len(missing)} of {len(images)} images, "
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

    start = time.perf_counter()
    crf_seconds = 0.0
    failed: list[Path] = []
    with tqdm(pairs, desc="crf", unit="image", file=sys.stderr, dynamic_ncols=True) as bar:
        for image, anno in bar:
            bar.set_postfix_str(image.name, refresh=False)
            try:
                refined = _process_pair(image, anno, out_dir / (image.stem + ".png"),
                                        overlay_dir / (image.stem + ".png") if overlay_dir else None, params,
                                        image_name="image", anno_name="annotation")
            except CLIError as exc:
                failed.append(image)
                tqdm.write(f"{PROG} crf: error: {exc}", file=sys.stderr)
                continue
            crf_seconds += refined.crf_seconds
    total = time.perf_counter() - start
    done = len(pairs) - len(failed)
    print(f"refined {done} of {len(images)} images into {str(out_dir)!r}"
          + (f"; {len(missing)} without annotation" if missing else "")
          + (f"; {len(failed)} failed: {_names(failed)}" if failed else ""))
    print(f"time: CRF {crf_seconds:.3f} s, total {total:.3f} s (with image input/output)"
          + (f", {total / done:.3f} s per image" if done else ""))
    return 1 if failed else 0


def _run_crf(args) -> int:
    params = _params(args)
    if Path(args.image).is_dir():
        return _run_crf_folder(args, params)
    return _run_crf_file(args, params)


def _run_demo(args) -> int:
    from importlib import resources

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
    refined = refine_annotation(image, anno, params)
    out, overlay = Path.cwd() / DEMO_RESULT, Path.cwd() / DEMO_OVERLAY
    _save_image(refined.result, out, "the demo result")
    _save_image(make_overlay(image, anno, refined.unknown, refined.result), overlay, "the demo overlay")
    total = time.perf_counter() - start
    print(f"refined the bundled example photo ({_size(image)}, {_label_summary(refined)}, "
          f"{params.iterations} iterations)")
    print(f"wrote {out}")
    print(f"wrote {overlay} (photo | coarse annotation | refined result)")
    print(f"time: CRF {refined.crf_seconds:.3f} s, total {total:.3f} s (with image input/output)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parser and entry point.

_CRF_DESCRIPTION = """\
Refine a coarse colour annotation ANNO of the photo IMAGE with a fully connected (dense) CRF and write
the refined labelling to OUT, an RGB image of the photo's size (use .png). Reproduces pydensecrf's
examples/inference.py pixel for pixel.

Every distinct colour of ANNO is a label; pure black (0,0,0) means "unknown" (fully transparent pixels
too). If ANNO has no black pixel at all, every colour is a label and none is unknown (zero_unsure=False);
old versions of the pydensecrf example always used zero_unsure=True, which mislabels such annotations.
The CRF has a Gaussian smoothness term on the pixel positions (y, x) and a bilateral appearance term on
(y, x, r, g, b), both with symmetric normalisation and Potts compatibilities.

Folder mode: if IMAGE and ANNO are folders, every image in IMAGE (not in its subfolders) whose annotation
has the same name (without extension; .png, .jpg, ...) in ANNO is refined into OUT/<name>.png; OUT (and
--overlay) are created as needed, and images without annotation are listed and skipped."""

_EPILOG = """\
exit codes: 0 success; 1 some images of a folder failed (the others were written); 2 bad arguments or
input (message names the argument); 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="deeplab_fast command-line tool: DeepLab segmentation and dense CRF refinement.",
        epilog="Run 'deeplab-fast COMMAND --help' for a command's options. 'python -m deeplab_fast' is "
               "the same as 'deeplab-fast'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    crf = sub.add_parser("crf", help="refine a coarse colour annotation of a photo (or a folder of them)",
                         description=_CRF_DESCRIPTION, epilog=_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    crf.add_argument("image", metavar="IMAGE", help="the photo (RGB), or a folder of photos")
    crf.add_argument("anno", metavar="ANNO", help="its coarse colour annotation, or a folder of them")
    crf.add_argument("out", metavar="OUT", help="where to write the result (.png), or a folder in folder mode")
    d = CrfParams()
    g = crf.add_argument_group("CRF parameters (defaults: pydensecrf's example)")
    g.add_argument("--gt-prob", type=_probability, default=d.gt_prob, metavar="P",
                   help="probability that an annotated pixel's colour is right, in (0, 1) (default %(default)s)")
    g.add_argument("--gaussian-sxy", type=_positive_float, default=d.gaussian_sxy, metavar="PX",
                   help="spatial std. dev. of the smoothness term, pixels (default %(default)s)")
    g.add_argument("--gaussian-compat", type=_float, default=d.gaussian_compat, metavar="W",
                   help="weight (Potts compatibility) of the smoothness term (default %(default)s)")
    g.add_argument("--bilateral-sxy", type=_positive_float, default=d.bilateral_sxy, metavar="PX",
                   help="spatial std. dev. of the appearance term, pixels (default %(default)s)")
    g.add_argument("--bilateral-srgb", type=_positive_float, default=d.bilateral_srgb, metavar="I",
                   help="colour std. dev. of the appearance term, 8-bit levels (default %(default)s)")
    g.add_argument("--bilateral-compat", type=_float, default=d.bilateral_compat, metavar="W",
                   help="weight (Potts compatibility) of the appearance term (default %(default)s)")
    g.add_argument("--iterations", type=_nonnegative_int, default=d.iterations, metavar="N",
                   help="mean-field iterations (default %(default)s)")
    o = crf.add_argument_group("other options")
    o.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads); the result does not depend on it "
                        "(default: torch's default)")
    o.add_argument("--overlay", metavar="PATH", default=None,
                   help="also write a side-by-side image: photo | annotation over photo | result over photo "
                        "(a folder in folder mode)")
    o.add_argument("--max-labels", type=_labels_limit, default=d.max_labels, metavar="N",
                   help="refuse annotations with more colours than this, a sign of a lossy or anti-aliased "
                        "annotation (default %(default)s)")
    crf.set_defaults(run=_run_crf)

    demo = sub.add_parser("demo", help="refine the bundled example photo; writes crf_demo_result.png and "
                                       "crf_demo_overlay.png into the current folder",
                          description=f"Refine the bundled example photo (from pydensecrf's examples, MIT "
                                      f"licence) with its coarse annotation, and write {DEMO_RESULT} and "
                                      f"{DEMO_OVERLAY} (photo | annotation | result) into the current "
                                      f"folder.")
    demo.set_defaults(run=_run_demo)

    from .cli_models import add_parsers

    add_parsers(sub)
    from .cli_train import add_parsers as add_train_parsers

    add_train_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deeplab-fast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"\n{PROG}: error: a command is required (crf, demo, segment, bench, train or eval)", file=sys.stderr)
        return 2

    import torch

    previous_threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        return args.run(args)
    except CLIError as exc:
        sys.stdout.flush()
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    sys.exit(main())
