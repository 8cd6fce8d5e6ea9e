"""The training data of one epoch, the same at any step and with any number of DataLoader workers.

Each sample's augmentation draws (random scale, crop, flip) come from a generator of its own, seeded from (the run's
seed, the epoch, the sample's index) by :func:`sample_seed`, never from a worker's or the main process's RNG. So a
run resumed mid-epoch, with ``--workers 0`` or 8, draws what an uninterrupted run drew, and the main process's RNG
(restored from the checkpoint) serves the dropout masks alone. The order is the ``DistributedSampler``'s for the
epoch; a resumed run skips the batches it has already used.
"""
from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["sample_seed", "SeededSamples", "epoch_loader"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run seeded ``seed`` (numpy's ``SeedSequence``: distinct
    triples give independent streams)."""
    state = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededSamples(Dataset):
    """``dataset``'s pairs (untransformed) through ``transform(image, target, generator=g)``, with ``g`` seeded
    by :func:`sample_seed` (``seed``, ``epoch``, the index)."""

    def __init__(self, dataset, transform, seed: int, epoch: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        return self.transform(image, target, generator=generator)


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: the main process stops the run at a step boundary (a worker
    ended by the signal would break the loader first). They exit with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_loader(dataset, transform, sampler, cfg, epoch: int, skip: int, rank: int,
                 device: torch.device) -> DataLoader:
    """The DataLoader of one epoch of the run ``cfg`` (a ``TrainConfig``) over ``dataset`` (untransformed pairs),
    resuming after ``skip`` batches."""
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip * cfg.batch_size:]
    # The loader's own generator: its per-iterator seed draw must not consume the global RNG (the dropout's).
    loader_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + 1000003 * rank)
    return DataLoader(SeededSamples(dataset, transform, cfg.seed, epoch), batch_size=cfg.batch_size,
                      sampler=indices, num_workers=cfg.workers, drop_last=True, pin_memory=device.type == "cuda",
                      generator=loader_gen,
                      worker_init_fn=_leave_stop_signals_to_the_main_process if cfg.workers else None)
