"""``deeplab-fast``: the command-line tool of deeplab_fast. One module per command family:

    crf.py       deeplab-fast crf IMAGE ANNO OUT / crf IMAGES/ ANNOS/ OUT/ / demo   (dense CRF refinement)
    crf3d.py     deeplab-fast crf3d IMAGE [IMAGE ...] PROB OUT                      (volumes: NIfTI, .npy)
    segment.py   deeplab-fast segment IMAGE... --weights NAME|FILE|URL / bench     (the models)
    train.py     deeplab-fast train / eval                                         (training, evaluation)
    _common.py   what they share: CLIError and exit codes, argument types, parent parsers for the shared
                 options (--threads, --device, --crf, --data, ...), library errors as one-line messages

The commands only parse, check and call the library (``deeplab_fast.densecrf.refine``, ``deeplab_fast.io``,
``deeplab_fast.models``, ``deeplab_fast.train``, ``deeplab_fast.benchmark``); nothing outside this package
imports it, except ``python -m deeplab_fast`` (``deeplab_fast/__main__.py``).

Exit codes: 0 success; 1 the work failed on valid arguments (some images of a folder; an unreadable or unusable
checkpoint; a failed download); 2 bad arguments or input, with a message naming the argument; 130 interrupted.

From Python, :func:`main` takes the argument list and returns the exit code, e.g.
``main(["crf", "im.png", "anno.png", "out.png", "--threads", "1"])``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..densecrf.refine import CrfParams, make_overlay, refine_annotation
from ._common import EXIT_INTERRUPTED, EXIT_USAGE, PROG, CLIError

__all__ = ["main", "build_parser", "CLIError", "CrfParams", "refine_annotation", "make_overlay"]

COMMANDS = ("crf", "demo", "crf3d", "segment", "bench", "train", "eval")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import crf, crf3d, segment, train

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="deeplab_fast command-line tool: DeepLab segmentation and dense CRF refinement (images and volumes).",
        epilog="Run 'deeplab-fast COMMAND --help' for a command's options. 'python -m deeplab_fast' is "
               "the same as 'deeplab-fast'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    crf.add_parsers(sub)
    crf3d.add_parsers(sub)
    segment.add_parsers(sub)
    train.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deeplab-fast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"\n{PROG}: error: a command is required ({', '.join(COMMANDS[:-1])} or {COMMANDS[-1]})",
              file=sys.stderr)
        return EXIT_USAGE

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
        return EXIT_INTERRUPTED
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    sys.exit(main())
