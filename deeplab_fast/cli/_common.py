"""What the ``deeplab-fast`` commands share: the error type and exit codes, the one handler that turns every
failure into one line and an exit status (``report_error``, with ``library_errors`` and ``working_on`` for the
library's errors and resource failures), argument types, parent parsers for the options several commands take,
and loading a model from the command line's options."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import models
from ..data.transforms import PREPROCESSING_CHOICES
from ..io import LOSSY_EXTS, same_file
from ..models import CheckpointError
from ..nn import PRESETS
from ..train import FAMILIES, TrainingInterrupted, distributed, family, read_training_checkpoint

PROG = "deeplab-fast"

# Exit codes: 0 success; 1 the work failed on valid arguments (an unreadable or corrupt checkpoint, a failed
# download, some images of a folder, out of memory or disk space, a diverged training run); 2 bad arguments or input
# (a missing file, a size mismatch, ...); 130 interrupted (Ctrl-C); a training run stopped by SIGTERM / SIGINT
# after writing its checkpoint: 143 / 130 (128 + the signal number).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

_FLOAT32 = np.finfo(np.float32)


class CLIError(Exception):
    """A user-facing error: printed as ``deeplab-fast CMD: error: MESSAGE``, no traceback; ``code`` is the exit
    status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class StoppedWithAnotherProcess(Exception):
    """Under torchrun: this process stops because another one failed before the work began; that process printed
    why. ``code`` is its exit status, which this process exits with too, silently."""

    def __init__(self, code: int):
        super().__init__(f"stopped: another process failed (exit status {code})")
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
        resource = resource_error(exc, prefix.rstrip(": "))
        if resource is not None:
            raise resource from None
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
        with working_on(f"{option} {str(weights)!r}"):
            model = models.build_model(name, state, weights=resolved, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(f"{option} {str(weights)!r} does not fit --model {name}: {first}") from None
    return model.eval(), resolved


def _families_with(option: str) -> str:
    return "/".join(f.name for f in FAMILIES.values() if option in f.options)


def model_kwargs_option(args, family_name: str) -> dict:
    """The model options of ``--model-kwargs`` (JSON) and ``--width-divisor`` (the families whose
    ``Family.options`` have it: v1), checked."""
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
        if "width_divisor" not in family(family_name).options:
            raise CLIError(f"--width-divisor is for the {_families_with('width_divisor')} models, not {args.model}")
        kwargs["width_divisor"] = args.width_divisor
    return kwargs


def load_model_from_options(args, default_model: str | None = None):
    """``(model name, model in eval mode, input preprocessing, training checkpoint or None)`` from ``--weights``,
    ``--model``, ``--num-classes``, ``--width-divisor``, ``--model-kwargs`` and ``--preprocessing`` (``eval``,
    ``segment``). A ``deeplab-fast train`` checkpoint gives the defaults of these options: its model, that
    model's options, its class count and the preprocessing it was trained with; otherwise the model is
    ``default_model`` (CLIError when None) and the preprocessing the weights'."""
    saved, ckpt = {}, None
    if os.path.exists(args.weights):
        with library_errors(f"--weights {args.weights!r}: "):
            ckpt = read_training_checkpoint(args.weights)
        saved = ckpt["args"] if ckpt is not None else {}
    name = args.model or saved.get("model") or default_model
    if name is None:
        if not os.path.exists(args.weights) and "://" not in args.weights:
            raise CLIError(f"--weights {args.weights!r}: no such file")
        raise CLIError("--model is required (the weights are not a 'deeplab-fast train' checkpoint naming it)")
    if name not in models.list_models():
        raise CLIError(f"the checkpoint's model {name!r} is not a registered model ({', '.join(models.list_models())})")
    kwargs = dict(saved.get("model_kwargs") or {}) if saved.get("model") == name else {}
    args.model = name
    kwargs.update(model_kwargs_option(args, models.model_entry(name).family))
    model, weights = load_model(name, args.weights, args.num_classes or saved.get("num_classes"), **kwargs)
    preprocessing = args.preprocessing or saved.get("preprocessing") or weights.meta["normalization"]["preprocessing"]
    return name, model, preprocessing, ckpt


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


def thread_count(text: str) -> int:
    """``--threads``: at least 1 and at most 4 x the machine's cores (torch's thread pool cannot start many more, and
    failed in odd places when asked to)."""
    value = _int(text, 1)
    cores = os.cpu_count() or 1
    if value > 4 * cores:
        raise argparse.ArgumentTypeError(f"at most {4 * cores} (4 x the {cores} CPU cores), got {text!r}")
    return value


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
    p.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads), up to 4 x the cores; results do not depend on it "
                        "(default: torch's)")
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
                   help=f"{_families_with('width_divisor')} only: divide every channel count by D (a small model "
                        "for quick experiments)")
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
    """``--device``: "auto" is cuda when available; under torchrun, cuda is this process's GPU (``LOCAL_RANK``).
    CLIError for cuda without a device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    if distributed.process_group() is not None:
        return distributed.resolve_device(name, distributed.local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


# ---------------------------------------------------------------------------------------------------------
# Every command's failures become one line and an exit status here (main() calls report_error).


def _resource_problem(exc: BaseException) -> str | None:
    """What ran out, for the failures that are about the machine rather than the input's content: memory (Python's
    MemoryError, numpy's, torch's CPU and CUDA allocators) and disk space; None for anything else."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "out of memory"
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)):
        return "out of memory"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return None


_RESOURCE_HINT = {"out of memory": "try a smaller input (or --batch 1), fewer --threads, or a machine with more "
                                   "memory",
                  "no space left on the device": "free some disk space or write elsewhere"}


def resource_error(exc: BaseException, what: str = "") -> CLIError | None:
    """The one-line CLIError (exit 1) for a resource failure ``exc`` while working on ``what`` (the input, e.g.
    "IMAGE 'big.png'"), naming what ran out and what to try; None when ``exc`` is not one."""
    problem = _resource_problem(exc)
    if problem is None:
        return None
    detail = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0][:160]}" if str(exc).strip() else "")
    return CLIError(f"{what + ': ' if what else ''}{problem} ({detail}); {_RESOURCE_HINT[problem]}", EXIT_FAILED)


@contextlib.contextmanager
def working_on(what: str) -> Iterator:
    """Resource failures raised in the block (memory, disk space) become a one-line CLIError naming ``what``."""
    try:
        yield
    except CLIError:
        raise
    except (MemoryError, RuntimeError, OSError) as exc:
        error = resource_error(exc, what)
        if error is None:
            raise
        raise error from None


def error_line(command: str, message: str) -> str:
    return f"{PROG} {command}: error: {message}"


def write_line(text: str, file=None) -> None:
    """``text`` as one line above any progress bar, on ``file`` (default stdout), in one write and flushed: the
    lines of several processes sharing an output (torchrun) never mix, also unbuffered (``python -u``)."""
    file = sys.stdout if file is None else file
    tqdm.write(text + "\n", file=file, end="")
    file.flush()


def report_error(command: str, exc: BaseException) -> int:
    """Prints the one line for an exception that ended ``command`` and returns the exit status: a CLIError's
    message and code; for ``StoppedWithAnotherProcess``, nothing and the other torchrun process's status; a
    training run stopped by a signal (its checkpoint written): 128 + the signal number; Ctrl-C elsewhere: 130; a
    diverged training run (FloatingPointError) and resource failures: 1. Anything else is a bug and is raised
    again (with its traceback)."""
    sys.stdout.flush()
    if isinstance(exc, CLIError):
        print(error_line(command, str(exc)), file=sys.stderr)
        return exc.code
    if isinstance(exc, StoppedWithAnotherProcess):
        return exc.code
    if isinstance(exc, TrainingInterrupted):
        print(f"{PROG} {command}: {exc}", file=sys.stderr)
        return exc.exit_status
    if isinstance(exc, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, FloatingPointError):
        print(error_line(command, str(exc).strip().splitlines()[0]), file=sys.stderr)
        return EXIT_FAILED
    error = resource_error(exc)
    if error is not None:
        print(error_line(command, str(error)), file=sys.stderr)
        return error.code
    raise exc
