"""The checkpoints of ``deeplab-fast train``: writing them, reading them back, and the CRF a CRF-as-RNN run trained.

``OUT/last.pth`` is a dict with :data:`CHECKPOINT_KEYS` (``"model"`` is the plain model's state dict, so
``models.load_checkpoint`` and ``deeplab-fast segment/eval --weights`` read it; a run with an extra head adds
``"extra_head"``, and :func:`load_trained_crf` rebuilds a CRF-as-RNN run's CRF from it and ``args["crf_rnn"]``),
written atomically (:func:`deeplab_fast.io.save_checkpoint`).
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Optional

import torch
from torch import nn

from ..io import save_checkpoint as save_atomically
from ..models import CheckpointError, load_checkpoint
from .crf_rnn import CRFasRNNStage

__all__ = ["CHECKPOINT_KEYS", "save_checkpoint", "read_training_checkpoint", "load_training_checkpoint",
           "upgrade_args", "load_trained_crf"]

# What a training checkpoint holds ("scaler" and "rng" may be empty).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "args", "rng")


def save_checkpoint(path, state, args: dict) -> None:
    """Writes the training checkpoint of ``state`` (a :class:`~deeplab_fast.train.TrainState`) atomically:
    ``CHECKPOINT_KEYS``, plus ``"extra_head"`` when there is one and ``"best_miou"`` once the run has validated."""
    ckpt = dict(model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
                scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict(), step=state.step,
                args=args, rng=torch.get_rng_state())
    if state.extra_head is not None:
        ckpt["extra_head"] = state.extra_head.state_dict()
    if getattr(state, "best_miou", float("-inf")) > float("-inf"):
        ckpt["best_miou"] = state.best_miou
    save_atomically(ckpt, path)


def upgrade_args(args: dict) -> dict:
    """A checkpoint's ``"args"`` in today's names: checkpoints written before the input preprocessing was called
    so stored it as ``"mode"`` (in ``"crf_rnn"`` too)."""
    args = dict(args)
    if "mode" in args:
        args.setdefault("preprocessing", args["mode"])
        del args["mode"]
    stage = args.get("crf_rnn")
    if isinstance(stage, dict) and "mode" in stage:
        stage = dict(stage)
        stage.setdefault("preprocessing", stage.pop("mode"))
        args["crf_rnn"] = stage
    return args


def read_training_checkpoint(path) -> Optional[dict]:
    """The ``deeplab-fast train`` checkpoint in ``path`` (a dict with a ``"model"`` state dict and ``"args"``,
    in today's names: :func:`upgrade_args`), or None when the file is readable but another kind of checkpoint.
    ValueError naming the file when ``torch.load(weights_only=True)`` cannot read it; FileNotFoundError when it
    is missing."""
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: '{path}'") from None
    except Exception:  # noqa: BLE001 - load_checkpoint words the error
        load_checkpoint(path)  # raises its ValueError (or FileNotFoundError / a directory's ValueError)
        raise ValueError(f"cannot read '{path}'") from None  # not reached: load_checkpoint raised
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("args"), dict):
        obj["args"] = upgrade_args(obj["args"])
        return obj
    return None


def load_training_checkpoint(path) -> dict:
    """The ``deeplab-fast train`` checkpoint in ``path``, checked for every key ``resume`` needs; ValueError
    naming the file and what was expected otherwise."""
    ckpt = read_training_checkpoint(path)
    expected = ", ".join(CHECKPOINT_KEYS[:-2])
    if ckpt is None:
        raise CheckpointError(f"'{os.fspath(path)}' is not a 'deeplab-fast train' checkpoint (expected a dict with "
                              f"{expected}, as OUT/last.pth holds); a plain state dict can start a run with --init")
    missing = [k for k in ("optimizer", "scheduler", "step") if k not in ckpt]
    bad_step = "step" in ckpt and not (isinstance(ckpt["step"], int) and ckpt["step"] >= 0)
    if missing or bad_step or not isinstance(ckpt.get("optimizer"), dict):
        what = f"it lacks {', '.join(missing)}" if missing else "its step or optimizer entry is malformed"
        raise CheckpointError(f"'{os.fspath(path)}' is not a complete 'deeplab-fast train' checkpoint ({what}; "
                              f"expected {expected})")
    return ckpt


def load_trained_crf(checkpoint, iterations: Optional[int] = None) -> nn.Module:
    """The CRF a CRF-as-RNN run trained, from its ``deeplab-fast train`` checkpoint (a path or the loaded dict):
    a :class:`deeplab_fast.nn.DenseCRF` with the learned compatibilities (still ``trainable``; under ``no_grad``
    it runs as the plain layer), with the run's iterations or ``iterations``. ValueError when the checkpoint
    holds no trained CRF."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_training_checkpoint(checkpoint)
    where = "the checkpoint" if isinstance(checkpoint, dict) else f"'{os.fspath(checkpoint)}'"
    spec = upgrade_args((ckpt or {}).get("args") or {}).get("crf_rnn")
    state = (ckpt or {}).get("extra_head")
    if not isinstance(spec, dict) or not isinstance(state, dict):
        raise ValueError(f"{where} holds no trained CRF (it was not written by a 'deeplab-fast train --crf-rnn' "
                         "run)")
    known = {f.name for f in fields(CRFasRNNStage)}
    stage = CRFasRNNStage(**{k: v for k, v in spec.items() if k in known})
    if iterations is not None:
        stage = stage.replace(iterations=iterations)
    crf = stage.build_crf(int(ckpt["args"]["num_classes"]))
    prefix = "crf."
    try:
        crf.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as exc:
        raise ValueError(f"{where}: its CRF does not fit {stage}: {str(exc).splitlines()[0]}") from None
    return crf
