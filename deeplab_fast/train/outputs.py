"""The files a training run keeps in its output folder, kept consistent across crashes and resumes.

- ``last.pth``: the latest checkpoint, only ever replaced by a finite one (:func:`check_finite` before each save;
  the writes are atomic: a temporary ``.last.pth.*.part`` file renamed over it).
- ``best.pth``: the checkpoint with the best validation mIoU so far, where the run validates (``val_every``).
- ``log.jsonl``: one JSON object per logged step; a resumed run first cuts it back to the step it resumes from
  (:func:`truncate_log`), so no step appears twice.
- Temporary files left by a run killed while writing are removed when the next run starts
  (:func:`remove_stale_parts`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..io import atomic_write

__all__ = ["OUTPUT_FILES", "remove_stale_parts", "truncate_log", "check_finite", "DivergenceError"]

OUTPUT_FILES = ("last.pth", "best.pth", "log.jsonl")


class DivergenceError(FloatingPointError):
    """The run diverged: a non-finite loss or parameter at ``step``; nothing non-finite was saved."""


def remove_stale_parts(out_dir) -> list:
    """Removes the temporary files (``.<name>.*.part``) that a run killed while writing one of
    :data:`OUTPUT_FILES` left in ``out_dir``; returns their paths."""
    removed = []
    for name in OUTPUT_FILES:
        for part in Path(out_dir).glob(f".{name}.*.part"):
            with contextlib.suppress(OSError):
                part.unlink()
                removed.append(part)
    return removed


def truncate_log(path, step: int) -> None:
    """Cuts the log back to the entries of steps up to ``step`` (the step a run resumes from); a line that is not
    JSON (the last one of a killed run, half written) is dropped too. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            kept.append(line + "\n")
    with atomic_write(path) as f:
        f.write("".join(kept).encode("utf-8"))


def check_finite(modules: Iterable[Optional[torch.nn.Module]], step: int, hint: str) -> None:
    """DivergenceError naming the first non-finite parameter or buffer of ``modules`` (None entries skipped) after
    ``step``; one host synchronisation when all are finite."""
    tensors = [(name, t) for m in modules if m is not None
               for name, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return
    name = next(name for name, t in tensors if not bool(torch.isfinite(t).all()))
    raise DivergenceError(f"train: {name} is not finite after step {step}: the run diverged; {hint}")
