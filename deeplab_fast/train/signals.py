"""Stopping a training run cleanly: SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl-C) ask the run to stop at
the next step boundary, where it writes its checkpoint and raises :class:`TrainingInterrupted`; the command exits
with the conventional status 128 + the signal number (143, 130). A second Ctrl-C interrupts at once (the
checkpoint on disk is then the last one written, never a partial file: writes are atomic)."""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from .distributed import process_group

__all__ = ["TrainingInterrupted", "StopSignals"]


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by ``signum`` at a step boundary after writing its checkpoint (``step``, ``checkpoint``).
    ``exit_status`` is 128 + ``signum``. A KeyboardInterrupt, so code that handles Ctrl-C handles it too."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint} (continue with --resume {checkpoint})" if checkpoint else ""
        super().__init__(f"stopped by {name} after step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + signum


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM and SIGINT set ``stop.signum`` instead of ending the process;
    ``stop.requested(device)`` says, at a step boundary, whether any process of the run received one (the
    processes of a torchrun run agree, so that they stop at the same step). Installed only in the main thread
    (Python delivers signals there); elsewhere the signals keep their handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, device: torch.device) -> Optional[int]:
        """The signal that asks the run to stop (the largest number among the processes), or None."""
        group = process_group()
        if group is None:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=device)
        group.all_reduce(flag, op=group.ReduceOp.MAX)
        return int(flag.item()) or None
