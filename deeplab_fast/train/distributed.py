"""The process group of a ``torchrun`` run, and the device each process works on.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` (or the :func:`distributed` block) initialises the
process group (NCCL on CUDA, gloo on the CPU); :func:`process_group` is then ``torch.distributed`` (None in a single
process). ``train`` and the command line's folder modes (``segment``, ``crf``) share it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["process_group", "init_distributed", "distributed", "local_rank", "all_gather", "resolve_device"]


def process_group():
    """``torch.distributed`` when a process group is initialised, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str):
    """Initialises the process group under torchrun (``WORLD_SIZE`` > 1): NCCL when ``device`` ("auto", "cuda",
    ...) runs on CUDA, gloo otherwise. Returns (rank, world size, local rank, whether this call created the
    group). ValueError when this process's ``LOCAL_RANK`` has no GPU (more processes per machine than GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, 0, False
    local = local_rank()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local, False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun: process LOCAL_RANK={local} has no GPU (this machine has "
                             f"{torch.cuda.device_count()}); start at most that many processes per machine "
                             "(--nproc_per_node)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local, True


@contextlib.contextmanager
def distributed(device: str) -> Iterator[tuple]:
    """:func:`init_distributed` for the block, which gets (rank, world size, local rank); the process group is
    destroyed at its end if the block created it. (0, 1, 0) and nothing else outside torchrun."""
    rank, world, local, created = init_distributed(device)
    try:
        yield rank, world, local
    finally:
        if created:
            dist.destroy_process_group()


def all_gather(value) -> list:
    """``value`` (any picklable object) of every process, in rank order (``torch.distributed.all_gather_object``);
    ``[value]`` in a single process. Every process must call it."""
    group = process_group()
    if group is None:
        return [value]
    gathered = [None] * group.get_world_size()
    group.all_gather_object(gathered, value)
    return gathered


def resolve_device(device, local_rank: int = 0) -> torch.device:
    """``device`` as a ``torch.device``: "auto" / None is CUDA when available, else the CPU; "cuda" is this
    process's GPU under torchrun. RuntimeError for "cuda" without a CUDA device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank if process_group() is not None else torch.cuda.current_device())
    return torch.device(device)
