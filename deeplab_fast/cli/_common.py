"""What the ``deeplab-fast`` commands share: the error type and exit codes, argument types, parent parsers for the
options several commands take, and the translation of library errors into one-line messages."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .. import models
from ..data.transforms import PREPROCESSING_CHOICES
from ..io import LOSSY_EXTS, same_file
from ..models import CheckpointError
from ..nn import PRESETS

PROG = "deeplab-fast"

# Exit codes: 0 success; 1 the work failed on valid arguments (an unreadable or corrupt checkpoint, a failed
# download, some images of a folder); 2 bad arguments or input (a missing file, a size mismatch, ...); 130
# interrupted.
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

_FLOAT32 = np.finfo(np.float32)


class CLIError(Exception):
    """A user-facing error: printed as ``deeplab-fast CMD: error: MESSAGE``, no traceback; ``code`` is the exit
    status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def library_errors(prefix: str = "", code: int = EXIT_USAGE, failed: tuple = ()) -> Iterator:
    """Turns the library's ValueError / OSError (FileNotFoundError included) raised in the block into a one-line
    CLIError ``prefix + message`` with exit status ``code``; checkpoint errors (``models.CheckpointError``: a
    file that is not a usable checkpoint), failed downloads and the exception types in ``failed`` exit with
    ``EXIT_FAILED`` instead."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        download = isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and "download" in message
        status = EXIT_FAILED if isinstance(exc, (CheckpointError, *failed)) or download else code
        raise CLIError(prefix + message, status) from None


def load_model(name: str, weights, num_classes: int | None = None, option: str = "--weights", **kwargs):
    """``(model in eval mode, its resolved weights)`` for ``get_model(name, weights=weights, ...)``, with the
    library's errors as one-line CLIErrors naming ``option``: a missing file or an unknown name exit 2, an
    unreadable file or a failed download exit 1, weights that do not fit the model exit 2."""
    with library_errors(f"{option} {str(weights)!r}: "):
        resolved = models.resolve_weights(name, weights)
        state = models.load_weights_state_dict(resolved)
    if num_classes:
        kwargs["num_classes"] = num_classes
    try:
        model = models.build_model(name, state, weights=resolved, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(f"{option} {str(weights)!r} does not fit --model {name}: {first}") from None
    return model.eval(), resolved


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Argument types: argparse turns their ArgumentTypeError into "argument --x: message", exit 2.


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def float32_weight(text: str) -> float:
    """A finite number that stays finite in float32 (the CRF's compatibility weights)."""
    value = finite_float(text)
    if abs(value) > float(_FLOAT32.max):
        raise argparse.ArgumentTypeError(f"must be within +-{float(_FLOAT32.max):.3g} (float32), got {text!r}")
    return value


def float32_std_dev(text: str) -> float:
    """A standard deviation: a positive number that float32 holds as a normal number (neither 0 nor inf); the
    range a given image can use is checked against it later."""
    value = positive_float(text)
    lo, hi = float(_FLOAT32.tiny), float(_FLOAT32.max)
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{text!r} is outside float32's range; the usable range is {lo:.3g} to "
                                         f"{hi:.3g} (and a minimum that depends on the image size)")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
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


def nonnegative_int(text: str) -> int:
    return _int(text, 0)


def positive_int(text: str) -> int:
    return _int(text, 1)


def labels_limit(text: str) -> int:
    return _int(text, 2)


def scales(text: str) -> tuple:
    """Comma-separated positive numbers, e.g. ``0.5,0.75,1.0``."""
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,0.75,1.0, got {text!r}") from None
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------------------
# Parent parsers: the options several commands share, defined once.


def threads_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads); results do not depend on it (default: torch's)")
    return p


def device_parent(help_text: str = "where to run (default: cuda when available)") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=help_text)
    return p


def crf_preset_parent(help_text: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--crf", metavar="PRESET", choices=sorted(PRESETS), default=None,
                   help=f"{help_text}: {' or '.join(sorted(PRESETS))}")
    return p


def data_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", required=True, metavar="ROOT", help="the VOC2012 folder (or one holding VOCdevkit/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def model_options_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--width-divisor", type=positive_int, default=None, metavar="D",
                   help="v1 only: divide every channel count by D (a small model for quick experiments)")
    p.add_argument("--model-kwargs", metavar="JSON", default=None,
                   help="more model options as JSON, e.g. '{\"msc\": true}' (v2), '{\"aux_loss\": true}' (v3), "
                        "'{\"dropout\": 0}' (v1)")
    return p


class _DeprecatedAlias(argparse.Action):
    """An old option name kept working: stores into the new option's dest and says which name to use."""

    def __init__(self, option_strings, dest, new_name: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        warn(f"{option_string} is deprecated; use {self.new_name}")
        setattr(namespace, self.dest, values)


def add_preprocessing_option(parser, help_text: str) -> None:
    """``--preprocessing caffe|torchvision`` (the input normalisation), and its old name ``--mode`` as a hidden,
    deprecated alias."""
    parser.add_argument("--preprocessing", choices=PREPROCESSING_CHOICES, default=None, help=help_text)
    parser.add_argument("--mode", dest="preprocessing", choices=PREPROCESSING_CHOICES, default=None,
                        action=_DeprecatedAlias, new_name="--preprocessing", help=argparse.SUPPRESS)


def model_names() -> list:
    return models.list_models()


def resolve_device(name: str):
    """``--device``: "auto" is cuda when available; CLIError for cuda without a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(name)


def check_output_path(path: Path, what: str, inputs: Sequence[Path]) -> None:
    """CLIError unless ``path`` can take an image: a known, writable extension, an existing folder, not a folder
    itself and not one of the inputs; a warning for lossy formats."""
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
        if same_file(path, src):
            raise CLIError(f"{what} {str(path)!r} is the same file as the input {str(src)!r}; "
                           "refusing to overwrite an input")
    if ext in LOSSY_EXTS:
        warn(f"{what} {str(path)!r}: {path.suffix} is lossy, the label colours will not be exact; prefer .png")
