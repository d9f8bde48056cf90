"""The random choices of a run as pure functions of (seed, step, rank): data order, masks, flips, crops.

Being functions of the step, they make a resumed run see exactly what the uninterrupted run would have seen."""

import functools

import torch


@functools.lru_cache(maxsize=2)   # this epoch's and, across an epoch boundary, the previous one's
def epoch_permutation(num_items, seed, epoch):
    """The data order of one epoch [num_items]: a permutation that depends only on (seed, epoch).

    Computed once per epoch, not at every step (a randperm of 1.28M items takes tens of ms). The cached tensor is
    shared by every caller: read it, never modify it in place.
    """
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, num_items, global_batch, seed, rank=0, world_size=1):
    """The dataset indices of this rank's share of the global batch at `step` [global_batch / world_size].

    Every epoch is a fresh permutation (what DistributedSampler does after set_epoch); each rank takes its own
    slice of the same global batch. Being a pure function of the step, it makes resuming mid-epoch exact.
    """
    steps_per_epoch = num_items // global_batch
    epoch, position = divmod(step, steps_per_epoch)
    per_rank = global_batch // world_size
    start = position * global_batch + rank * per_rank
    return epoch_permutation(num_items, seed, epoch)[start:start + per_rank].clone()   # not a view of the cache


STREAMS = ("masks", "flips")   # the random streams of one step; each has its own seed


def step_generator(seed, step, rank=0, device="cpu", stream="masks"):
    """A generator for one random stream of one step (`stream`: "masks" or "flips"), so that it too is a function
    of the step. Each stream has its own seed: with one seed for both, the flips of a batch and its mask noise would
    be draws of the same sequence (on the CPU, where both generators live, identical draws)."""
    return torch.Generator(device=device).manual_seed(
        ((seed * 1_000_003 + step) * 1_009 + rank) * len(STREAMS) + STREAMS.index(stream))


def augmentation_seed(seed, step, index):
    """The seed of one image's random crop and flip at one step."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 31)
