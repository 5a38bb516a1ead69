"""The DataLoaders of a (possibly data-parallel) run: each rank's shard of every split, in batches.

The training split is shuffled anew every epoch, the same way on every rank (DistributedSampler);
validation and test are split into disjoint shards that cover each image exactly once. The
BatchNorm recalibration pass reads its own fixed subset of the training images.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from prado_dist.data import PaintingsDataset, PreparedData


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`: disjoint shards covering a split exactly once.

    Unlike DistributedSampler, it never pads, so no validation image is counted twice.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_processes(requested: int | None, on_gpu: bool) -> int:
    """Loader processes: `requested`, else a few on a GPU machine and none on a CPU-only one."""
    # Batches are memcpy'd from the memory-mapped cache: on a CPU-only machine extra loader
    # processes only compete with training for the same cores; on a GPU they keep it fed.
    return requested if requested is not None else (min(4, os.cpu_count() or 1) if on_gpu else 0)


def split_loaders(
    dataset_of: Callable[[str], Dataset],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    pin_memory: bool,
) -> tuple[dict[str, DataLoader], DistributedSampler]:
    """train/val/test loaders of this rank's share of the global `batch_size`, and the training
    sampler (its epoch is set before every epoch, for a new shuffle)."""
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    per_rank_batch = batch_size // world_size
    train = dataset_of("train")
    train_sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loaders = {"train": DataLoader(train, per_rank_batch, sampler=train_sampler, **common)}
    for split in ("val", "test"):
        dataset = dataset_of(split)
        sampler = ShardSampler(len(dataset), rank, world_size)
        loaders[split] = DataLoader(dataset, per_rank_batch, sampler=sampler, **common)
    return loaders, train_sampler


def recalibration_loader(
    data: PreparedData, images: int, *, batch_size: int, rank: int, world_size: int, seed: int, pin_memory: bool
) -> DataLoader:
    """This rank's share of `images` training images (a fixed random subset), in whole batches.

    Every rank gets as many batches as the others (SyncBatchNorm's forward is collective), and
    the loader has its own generator: the pass draws nothing from the global random stream, so
    training (dropout) goes on exactly as without it.
    """
    per_rank_batch = batch_size // world_size
    train_size = len(data.splits["train"])
    # At least 2 images a rank: train-mode BatchNorm1d (VGG's head) refuses a batch of one.
    per_rank = max(2, min(images, train_size) // world_size)
    if per_rank >= per_rank_batch:
        per_rank -= per_rank % per_rank_batch  # no small last batch: its batch statistics would be noisy
    order = torch.randperm(train_size, generator=torch.Generator().manual_seed(seed)).tolist()
    indices = order[: per_rank * world_size][rank::world_size]
    subset = Subset(PaintingsDataset(data, "train"), indices)
    return DataLoader(subset, per_rank_batch, generator=torch.Generator(), pin_memory=pin_memory)
