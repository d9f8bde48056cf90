"""The random choices of a run as pure functions of (seed, step, rank): data order, masks, flips, crops. So a
resumed run sees exactly what the uninterrupted run would have seen."""

import functools

import torch

STREAMS = ("masks", "flips")   # the random streams of one step; each has its own seed


@functools.lru_cache(maxsize=2)   # this epoch's and, across an epoch boundary, the previous one's
def epoch_permutation(num_items, seed, epoch):
    """The data order of one epoch [num_items], a function of (seed, epoch), computed once per epoch (a randperm of
    1.28M items takes tens of ms). Shared by every caller: never modify it in place."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, num_items, global_batch, seed, rank=0, world_size=1):
    """This rank's slice of the global batch at `step` [global_batch / world_size]: a fresh permutation per epoch."""
    steps_per_epoch = num_items // global_batch
    epoch, position = divmod(step, steps_per_epoch)
    per_rank = global_batch // world_size
    start = position * global_batch + rank * per_rank
    return epoch_permutation(num_items, seed, epoch)[start:start + per_rank].clone()   # not a view of the cache


def step_generator(seed, step, rank=0, device="cpu", stream="masks"):
    """A generator for one random stream ("masks" or "flips") of one step. Each stream has its own seed: with one for
    both, a batch's flips and its mask noise would be identical draws (on the CPU, where both generators live)."""
    return torch.Generator(device=device).manual_seed(
        ((seed * 1_000_003 + step) * 1_009 + rank) * len(STREAMS) + STREAMS.index(stream))


def augmentation_seed(seed, step, index):
    """The seed of one image's random crop and flip at one step."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 31)
