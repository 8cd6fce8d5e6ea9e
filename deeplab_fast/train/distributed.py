"""The process group of a ``torchrun`` run, and the device each process trains on.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` initialises the process group (NCCL on CUDA,
gloo on the CPU); :func:`process_group` is then ``torch.distributed`` (None in a single process).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["process_group", "init_distributed", "resolve_device"]


def process_group():
    """``torch.distributed`` when a process group is initialised, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed(device: str):
    """Initialises the process group under torchrun (``WORLD_SIZE`` > 1). Returns (rank, world size, local rank,
    whether this call created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


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
