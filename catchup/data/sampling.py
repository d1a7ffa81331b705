"""Sample order and per-sample augmentation seeds that a resumed run reproduces exactly.

Augmentations draw from three generators: torchvision's from torch, timm's RandomResizedCrop, RandAugment and
random erasing from Python's `random`, AugMix from NumPy's global generator. `seeded` seeds all three for one
sample, so a sample's augmentation depends only on (seed, epoch, sample position), not on which loader worker
drew it nor on how far the loader had prefetched when a checkpoint was taken.
"""
from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

_MASK = 2**63 - 1


def item_seed(*parts: int) -> int:
    """A 63-bit seed mixing the integers in `parts` (order matters)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_000_007 + int(part) + 1) % _MASK
    return seed


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator, `random` and NumPy's global generator; in the main process put their states
    back afterwards, so the rest of the program's random streams do not depend on how many samples were loaded."""
    restore = get_worker_info() is None
    saved = (torch.random.default_generator.get_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            torch.random.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class EpochSeeded(Dataset):
    """Seeds the augmentation of each sample from (seed, epoch, key).

    The key is the sample index, or the `(index, draw)` pair `RepeatedAugmentation` yields so that the repeats
    of one image in an epoch get different augmentations.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, 0)
        with seeded(item_seed(self.seed, self.epoch, index, draw)):
            return self.dataset[index]


class RepeatedAugmentation(Sampler):
    """timm's RepeatAugSampler streams for every process, laid out for Accelerate's batch sharding.

    Accelerate's `prepare` hands batch j of the loader's batch sampler to process j % N, whatever the sampler,
    so a sampler that is already distributed would be split a second time. This one yields the N per-process
    streams of `timm.data.distributed_sampler.RepeatAugSampler` interleaved batch by batch: after Accelerate's
    split, process r receives exactly timm's rank-r stream (each image `repeats` times per epoch, its copies spread
    over the processes, the epoch as long as without repeats). Each item is `(index, draw)`, draw being the
    item's position in the epoch, so the copies of an image get different augmentations under `EpochSeeded`.
    timm seeds the permutation with the epoch alone; `seed` offsets it, so runs with different seeds differ.
    """

    def __init__(self, dataset_len: int, repeats: float, num_processes: int, batch_size: int, seed: int = 0):
        from timm.data.distributed_sampler import RepeatAugSampler

        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.streams = [RepeatAugSampler(range(dataset_len), num_replicas=num_processes, rank=r, shuffle=True,
                                         num_repeats=repeats) for r in range(num_processes)]
        self.steps = len(self.streams[0]) // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size * len(self.streams)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = []
        for stream in self.streams:
            stream.set_epoch(item_seed(self.seed, self.epoch) % 2**62)
            per_rank.append(list(stream))
        b, draw = self.batch_size, 0
        for step in range(self.steps):
            for indices in per_rank:
                for index in indices[step * b:(step + 1) * b]:
                    yield index, draw
                    draw += 1


class SeededStream(IterableDataset):
    """A timm iterable dataset (WebDataset shards) with per-sample seeded transforms and a per-epoch restart.

    timm's reader builds its pipeline once per copy and seeds its sample shuffle from the loader worker's seed;
    each epoch here starts from a fresh copy of the reader, and the loader's worker seeds are set from
    (seed, epoch) by `set_epoch`, so an epoch's order is a function of the seed and the epoch and a resumed run
    re-reads the same stream. Sample k of loader worker w gets the augmentation seed (seed, epoch, rank, w, k).

    Under N processes the reader already reads this process's shards only, while Accelerate's `prepare` keeps
    batch-sized run r of every N runs of an iterable dataset for process r. Each run of real samples is
    therefore put at this process's place among N - 1 runs of `None` fillers, which are never read or decoded.
    """

    def __init__(self, dataset: IterableDataset, transform, seed: int, batch_size: int, loader_seed: torch.Generator):
        self.dataset, self.transform, self.seed, self.batch_size = dataset, transform, seed, batch_size
        self.loader_seed, self.epoch = loader_seed, 0
        reader = dataset.reader  # type: ignore[attr-defined]
        self.rank, self.num_processes = reader.dist_rank, reader.dist_num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self.loader_seed.manual_seed(item_seed(self.seed, epoch, 1))

    def __len__(self) -> int:
        return len(self.dataset) * self.num_processes  # type: ignore[arg-type]

    def _samples(self) -> Iterator:
        reader = copy.copy(self.dataset.reader)  # type: ignore[attr-defined]
        reader.ds, reader.worker_info = None, None
        reader.worker_seed = item_seed(self.seed, self.epoch, 2)   # replaced by the worker's seed in a worker
        info = get_worker_info()
        worker = 0 if info is None else info.id
        for k, (img, target) in enumerate(reader):
            with seeded(item_seed(self.seed, self.epoch, self.rank, worker, k)):
                yield self.transform(img) if self.transform is not None else img, target

    def __iter__(self) -> Iterator:
        if self.num_processes == 1:
            yield from self._samples()
            return
        b, before, after = self.batch_size, self.rank, self.num_processes - 1 - self.rank
        run: list = []
        for sample in self._samples():
            run.append(sample)
            if len(run) == b:
                yield from [None] * (before * b)
                yield from run
                yield from [None] * (after * b)
                run = []
