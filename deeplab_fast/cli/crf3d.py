"""``deeplab-fast crf3d``: refining a probability volume with its image volume by the volumetric dense CRF.

The model is :func:`deeplab_fast.ops.dense_crf_3d` (Kamnitsas et al.'s 3-D dense CRF with voxel spacing); the
volume input / output is :func:`deeplab_fast.io.load_volume` / :func:`deeplab_fast.io.save_volume` (NIfTI through
nibabel, NumPy .npy). Array axes are used as they are stored (a NIfTI volume's voxel axes i, j, k), with the
spacing of the image's header (its zooms) unless --spacing is given.

Exit codes: 0 success; 1 the work failed on valid arguments (not enough memory, nibabel missing); 2 bad arguments
or input (missing or unreadable file, shape mismatch, values that are not probabilities, ...), with a message
naming the argument; 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..io import VOLUME_EXTS, Volume, load_volume, same_file, save_volume, volume_format
from ._common import (EXIT_FAILED, CLIError, finite_float, float32_std_dev, float32_weight, library_errors,
                      nonnegative_int, positive_float, threads_parent, warn)

__all__ = ["add_parsers", "run_crf3d"]

# The probabilities' floor before -log (as pydensecrf's unary_from_softmax clips them).
PROB_FLOOR = 1e-5
# Probabilities may exceed [0, 1] by this much (rounding in the file's data type).
PROB_SLACK = 1e-3


def _read(path: str, what: str) -> Volume:
    try:
        with library_errors():
            return load_volume(Path(path), what)
    except ImportError as exc:
        raise CLIError(str(exc), EXIT_FAILED) from None


def _image_channels(volumes: list, names: list) -> np.ndarray:
    """IMAGE files (each [X, Y, Z] or [X, Y, Z, C]) as one [C, X, Y, Z] float32 array."""
    channels = []
    for vol, name in zip(volumes, names):
        data = vol.data
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise CLIError(f"IMAGE {name!r}: expected a 3-D volume or a 4-D one with channels last, got shape "
                           f"{data.shape}")
        if data.shape[:3] != volumes[0].data.shape[:3]:
            raise CLIError(f"IMAGE {name!r} has the volume shape {data.shape[:3]}, IMAGE {names[0]!r} "
                           f"{volumes[0].data.shape[:3]}; the modalities must be co-registered")
        channels.extend(np.moveaxis(data, -1, 0).astype(np.float32, copy=False))
    if not np.isfinite(np.stack([c.min() for c in channels] + [c.max() for c in channels])).all():
        raise CLIError(f"IMAGE {names[0]!r}: the intensities contain NaN or inf")
    return np.stack(channels)


def _probabilities(vol: Volume, name: str, shape: tuple) -> np.ndarray:
    """PROB ([X, Y, Z]: a foreground probability, two labels; [X, Y, Z, L]: one per label) as [L, X, Y, Z]."""
    p = vol.data
    if p.ndim == 3:
        p = np.stack([1.0 - p, p], axis=-1)
    if p.ndim != 4 or p.shape[-1] < 1:
        raise CLIError(f"PROB {name!r}: expected [X, Y, Z] (a foreground probability) or [X, Y, Z, L] (one per "
                       f"label), got shape {vol.data.shape}")
    if p.shape[:3] != shape:
        raise CLIError(f"PROB {name!r} has the volume shape {p.shape[:3]}, IMAGE {shape}; they must match")
    lo, hi = float(np.min(p)), float(np.max(p))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -PROB_SLACK or hi > 1 + PROB_SLACK:
        raise CLIError(f"PROB {name!r}: values from {lo:g} to {hi:g}; expected probabilities in [0, 1] (not "
                       "logits or labels)")
    return np.ascontiguousarray(np.moveaxis(p.astype(np.float32, copy=False), -1, 0))


def _check_output(path: str, what: str, inputs: list) -> Path:
    out = Path(path)
    if volume_format(out) is None:
        raise CLIError(f"{what} {path!r}: unknown volume format; name it .nii.gz, .nii or .npy")
    if out.is_dir():
        raise CLIError(f"{what} {path!r} is a folder")
    if not out.parent.is_dir():
        raise CLIError(f"{what} {path!r}: folder {str(out.parent)!r} does not exist")
    for src in inputs:
        if same_file(out, src):
            raise CLIError(f"{what} {path!r} is the same file as the input {src!r}; refusing to overwrite an input")
    return out


def _rescale(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """dense3dCrf's intensity mapping: clip to [lo, hi], then linearly to [0, 255]."""
    return (np.clip(image, lo, hi) - lo) * np.float32(255.0 / (hi - lo))


def run_crf3d(args) -> int:
    import torch
    from tqdm import tqdm

    from ..ops.dense_crf_3d import DEFAULTS_3D, dense_crf_3d

    names = list(args.image)
    gaussian_sigma = _one_or_three(args.gaussian_sigma, "--gaussian-sigma")
    bilateral_sigma = _one_or_three(args.bilateral_sigma, "--bilateral-sigma")
    out_path = _check_output(args.out, "OUT", names + [args.prob])
    prob_out = _check_output(args.prob_out, "--prob-out", names + [args.prob]) if args.prob_out else None
    if prob_out is not None and prob_out.resolve() == out_path.resolve():
        raise CLIError(f"--prob-out {args.prob_out!r} is the same file as OUT")
    if args.intensity_range is not None and not args.intensity_range[0] < args.intensity_range[1]:
        raise CLIError(f"--intensity-range {args.intensity_range[0]:g} {args.intensity_range[1]:g}: MIN must be "
                       "below MAX")

    stages = ["read IMAGE", "read PROB", f"dense CRF ({args.iterations} iterations)", "write"]
    start = time.perf_counter()
    with tqdm(total=len(stages), desc="crf3d", unit="step", file=sys.stderr, dynamic_ncols=True,
              disable=True if args.no_progress else None) as bar:
        bar.set_postfix_str(stages[0])
        volumes = [_read(name, "IMAGE") for name in names]
        image = _image_channels(volumes, names)
        bar.update()
        bar.set_postfix_str(stages[1])
        prob = _probabilities(_read(args.prob, "PROB"), args.prob, image.shape[1:])
        bar.update()

        spacing = args.spacing or volumes[0].spacing or (1.0, 1.0, 1.0)
        if args.intensity_range is not None:
            image = _rescale(image, *args.intensity_range)
        elif args.intensity_sigma is None and (image.min() < 0 or image.max() > 255):
            warn(f"IMAGE intensities range from {image.min():g} to {image.max():g}; the default --intensity-sigma 3 "
                 "is for 8-bit levels (dense3dCrf's): pass --intensity-range MIN MAX (mapped to 0..255) or "
                 "--intensity-sigma in the image's units")
        channels = image.shape[0]
        sigma = args.intensity_sigma or (DEFAULTS_3D["intensity_sigma"],)
        if len(sigma) not in (1, channels):
            raise CLIError(f"--intensity-sigma: give one value or one per channel ({channels}), got {len(sigma)}")
        unary = -torch.log(torch.from_numpy(prob).clamp_(min=PROB_FLOOR))
        bar.set_postfix_str(stages[2])
        crf_start = time.perf_counter()
        try:
            with library_errors():
                q = dense_crf_3d(unary[None], torch.from_numpy(image)[None], spacing=tuple(spacing),
                                 gaussian_sigma=gaussian_sigma, gaussian_compat=args.gaussian_compat,
                                 bilateral_sigma=bilateral_sigma,
                                 intensity_sigma=sigma[0] if len(sigma) == 1 else tuple(sigma),
                                 bilateral_compat=args.bilateral_compat, iterations=args.iterations)[0]
        except MemoryError as exc:
            raise CLIError(str(exc), EXIT_FAILED) from None
        crf_seconds = time.perf_counter() - crf_start
        bar.update()
        bar.set_postfix_str(stages[3])
        labels = q.argmax(0).numpy().astype(np.uint8 if q.shape[0] <= 256 else np.int16)
        with library_errors():
            save_volume(labels, out_path, "OUT", like=volumes[0], spacing=spacing)
            if prob_out is not None:
                save_volume(np.ascontiguousarray(np.moveaxis(q.numpy(), 0, -1)), prob_out, "--prob-out",
                            like=volumes[0], spacing=spacing)
        bar.update()
    total = time.perf_counter() - start
    shape = "x".join(str(s) for s in image.shape[1:])
    print(f"{Path(names[0]).name}: {shape} voxels, spacing {'x'.join(f'{s:g}' for s in spacing)}, {channels} "
          f"channel(s), {q.shape[0]} labels, {args.iterations} iterations -> {out_path}"
          + (f" (probabilities: {prob_out})" if prob_out else ""))
    print(f"time: CRF {crf_seconds:.3f} s, total {total:.3f} s (with volume input/output)")
    return 0


_DESCRIPTION = f"""\
Refine the probabilities PROB of a segmentation of the volume IMAGE with the volumetric fully connected
(dense) CRF (Kamnitsas et al., MedIA 2017: a smoothness term on voxel positions and an appearance term on
positions and intensities), and write the labels to OUT. Volumes: NIfTI ({VOLUME_EXTS[0]}, {VOLUME_EXTS[1]};
read and written with nibabel, keeping IMAGE's affine and header) or NumPy {VOLUME_EXTS[2]}.

IMAGE: one file per modality, each [X, Y, Z] (or [X, Y, Z, C]: channels last), co-registered; 1 to 13
channels in all. PROB: [X, Y, Z] (a foreground probability: two labels) or [X, Y, Z, L] (one probability
per label, last axis). Standard deviations are in mm: the voxel spacing comes from IMAGE's header (its
zooms) or --spacing (default 1 for .npy). Defaults are dense3dCrf's (for about 1 mm voxels and 8-bit
intensities): with other intensities, give --intensity-range MIN MAX (clipped and mapped to 0..255, as
dense3dCrf's application does) or --intensity-sigma in the image's units. OUT holds the labels (uint8);
--prob-out the refined probabilities [X, Y, Z, L] (float32).

The progress bar counts the stages (read, CRF, write); the CRF itself is one call (running its iterations
in chunks would rebuild the lattice each time, several times the cost of an iteration)."""

_EPILOG = """\
exit codes: 0 success; 1 not enough memory, or nibabel missing; 2 bad arguments or input (the message names
the argument); 130 interrupted."""


def add_parsers(sub) -> None:
    """Adds the ``crf3d`` command to the ``deeplab-fast`` parser."""
    from ..ops.dense_crf_3d import DEFAULTS_3D

    p = sub.add_parser("crf3d", help="refine a segmentation's probability volume with its image volume (NIfTI, .npy)",
                       description=_DESCRIPTION, epilog=_EPILOG, parents=[threads_parent()],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", nargs="+", help="the image volume(s): one per modality")
    p.add_argument("prob", metavar="PROB", help="the probability volume")
    p.add_argument("out", metavar="OUT", help="where to write the labels (.nii.gz, .nii or .npy)")
    g = p.add_argument_group("CRF parameters (defaults: dense3dCrf's, Kamnitsas et al. 2017)")
    g.add_argument("--iterations", type=nonnegative_int, default=DEFAULTS_3D["iterations"], metavar="N",
                   help="mean-field iterations (default %(default)s)")
    g.add_argument("--gaussian-sigma", type=std_devs, metavar="MM", default=(DEFAULTS_3D["gaussian_sigma"],),
                   help="smoothness term's standard deviation, mm: one value or three, X,Y,Z (default 3)")
    g.add_argument("--gaussian-compat", type=float32_weight, default=DEFAULTS_3D["gaussian_compat"], metavar="W",
                   help="its Potts weight (default %(default)s)")
    g.add_argument("--bilateral-sigma", type=std_devs, metavar="MM", default=(DEFAULTS_3D["bilateral_sigma"],),
                   help="appearance term's spatial standard deviation, mm: one value or three, X,Y,Z (default 5)")
    g.add_argument("--intensity-sigma", type=std_devs, metavar="I", default=None,
                   help="its intensity standard deviation: one value, or one per channel comma-separated (default "
                        "3, in 8-bit levels)")
    g.add_argument("--bilateral-compat", type=float32_weight, default=DEFAULTS_3D["bilateral_compat"], metavar="W",
                   help="its Potts weight (default %(default)s)")
    o = p.add_argument_group("volumes")
    o.add_argument("--spacing", type=spacings, metavar="X,Y,Z", default=None,
                   help="voxel size in mm along the array's axes (default: IMAGE's header, or 1 for .npy)")
    o.add_argument("--intensity-range", type=finite_float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="clip the intensities to [MIN, MAX] and map them to 0..255 (dense3dCrf's minMaxIntensities)")
    o.add_argument("--prob-out", metavar="PATH", default=None, help="also write the refined probabilities")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_crf3d)


def std_devs(text: str) -> tuple:
    """Comma-separated standard deviations (positive, float32), e.g. ``3`` or ``2.5,3,3``."""
    return tuple(float32_std_dev(t.strip()) for t in text.split(","))


def spacings(text: str) -> tuple:
    """Three comma-separated voxel sizes, e.g. ``0.9,0.9,2.5``."""
    values = tuple(positive_float(t.strip()) for t in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated sizes X,Y,Z, got {text!r}")
    return values


def _one_or_three(values: tuple, option: str):
    """A standard deviation option's values: one number (every axis) or three (X, Y, Z)."""
    if len(values) not in (1, 3):
        raise CLIError(f"{option}: give one value or three (X,Y,Z), got {len(values)}")
    return values[0] if len(values) == 1 else values
