"""The folder modes of ``deeplab-fast segment`` and ``crf`` under torchrun: each process's share of the inputs
(``Shard``), the up-front checks agreed between the processes, and their results gathered for rank 0's summary. The
process group and the devices are ``deeplab_fast.train.distributed``'s."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence, TypeVar

from ..train import distributed
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, StoppedWithAnotherProcess, library_errors

__all__ = ["Shard", "torchrun_shard"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of a folder-mode command (``segment``, ``crf``): ``rank`` of ``world`` processes
    (0 of 1 without torchrun). Every process lists the inputs and runs the checks identically; each then works
    on ``take(items)``, and the results are gathered for the summary, which ``main`` (rank 0) prints."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list:
        """This process's items of the ordered ``items``: every ``world``-th from ``rank`` on, so the shards are
        disjoint, cover the list, and do not depend on timing."""
        return list(items)[self.rank::self.world]

    def agreed(self, setup: Callable[[], T]) -> T:
        """``setup()`` (the up-front checks, the model) on every process; all go on only if all succeeded.
        Otherwise the lowest failing rank raises its error (the one line printed) and the others raise
        ``StoppedWithAnotherProcess`` with its exit status, so every process exits alike."""
        if self.world == 1:
            return setup()
        try:
            value, error = setup(), None
        except BaseException as exc:  # noqa: BLE001 - raised again below, after the other processes know
            value, error = None, exc
        code = 0 if error is None else getattr(error, "code", None)
        if error is not None and not isinstance(code, int):
            code = EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_FAILED
        codes = self.gather(code)
        failing = [r for r, c in enumerate(codes) if c]
        if not failing:
            return value
        if failing[0] == self.rank:
            raise error
        raise StoppedWithAnotherProcess(codes[failing[0]])

    def gather(self, value) -> list:
        """``value`` of every process, in rank order (``[value]`` without torchrun)."""
        return distributed.all_gather(value)


@contextlib.contextmanager
def torchrun_shard(device: str) -> Iterator[Shard]:
    """The block's ``Shard``: under torchrun (``WORLD_SIZE`` > 1) the process group for the block (gloo; NCCL
    when ``device`` runs on CUDA), else one process holding everything."""
    with contextlib.ExitStack() as stack:
        with library_errors():  # e.g. more processes than GPUs
            rank, world, _ = stack.enter_context(distributed.distributed(device))
        yield Shard(rank, world)
