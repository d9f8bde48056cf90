"""Where and how a script runs: the device, the precision, torchrun's processes, compiled blocks, loader workers."""

import atexit
import datetime
import multiprocessing.util   # registers multiprocessing's exit handler now, so that ours (below) runs before it
import os
import signal

import torch

import lmd
from util.cli import UserError


def select_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; asking for an absent device is an error, not a silent fallback."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(device for device, present in available.items() if present)
    if not available.get(name, False):
        raise UserError(f"--device {name} is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def autocast_dtype(precision, device):
    """bf16 autocast on CUDA when the GPU has bf16 units ('auto'), fp32 elsewhere unless bf16 is asked for explicitly.
    Only native support counts: V100s and T4s emulate bf16 (is_bf16_supported() says yes), slower than fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if precision == "bf16":
            raise UserError("this GPU has no native bf16 (emulated bf16 is slower than fp32); use --precision fp32")
        return None
    return torch.bfloat16


def timeout_minutes():
    """How long a collective (barrier, all-reduce) waits for the slowest rank: LMD_TIMEOUT_MINUTES, default 60.
    NCCL's 10 minutes is shorter than rank 0 scanning a large image folder while the others wait."""
    return float(os.environ.get("LMD_TIMEOUT_MINUTES", 60))


class Distributed:
    """torchrun's environment, or a single process. NCCL on CUDA, gloo on CPU."""

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.enabled = self.world_size > 1
        device = select_device(device_name)
        if device.type == "cuda" and self.enabled:
            # A scheduler that gives each task its own GPU leaves one visible device (index 0) whatever the rank.
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(minutes=timeout_minutes()))

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag):
        """True on every rank if `flag` is true on any rank (keeps the ranks stepping in lockstep)."""
        return self.any_each(flag)[0]

    def any_each(self, *flags):
        """For each flag (a bool or a one-element device tensor), whether it is true on any rank: one all-reduce."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")   # gloo: CPU, NCCL: CUDA
        values = torch.stack([torch.as_tensor(flag, device=device).float().reshape(()) for flag in flags])
        if self.enabled:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def main_first(self, function):
        """function() on rank 0 first, then on the other ranks: a download into a shared folder happens once. If it
        fails on rank 0, the other ranks stop too (with an error that points at rank 0's) instead of waiting."""
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except Exception as caught:
                error = caught
        if self.any(error is not None):   # also the barrier: the other ranks wait here for rank 0
            raise error if error is not None else UserError("rank 0 failed (its error is above); stopping")
        return result if self.is_main else function()

    def all_gather(self, tensor):
        """tensor [n, ...] (the same shape on every rank) -> [world_size * n, ...] on the CPU, rank 0's rows first."""
        device = self.device if self.device.type == "cuda" else "cpu"   # gloo gathers CPU tensors, NCCL CUDA ones
        pieces = [torch.empty_like(tensor, device=device) for _ in range(self.world_size)]
        torch.distributed.all_gather(pieces, tensor.to(device).contiguous())
        return torch.cat(pieces).cpu()


def compile_transformer_blocks(model):
    """torch.compile every transformer block in place (nearly all the FLOPs), not the whole model, which would
    recompile at each new mask ratio (a Python float) and give up after eight: dynamic shapes cover the blocks."""
    for module in model.modules():
        if isinstance(module, lmd.Block):
            module.compile(dynamic=True)
    return model


def loader_workers(requested=None):
    """Loader processes per training process: `requested`, or its share of the node's cores less one, at most 8."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, max(per_process - 1, 0))


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker_init_fn: loader processes ignore SIGINT and SIGTERM (SLURM and Ctrl-C signal them all), so
    that the training process saves before it shuts them down. (An orphan exits by itself: PyTorch's watchdog.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register   # atexit runs last-registered first: this comes before multiprocessing's own exit handler
def stop_loader_workers():
    """At exit, SIGKILL the loader workers still alive (daemonic children), and reap them. They ignore SIGTERM, so
    multiprocessing's exit handler (SIGTERM, then join) would wait forever: a run stopped mid-epoch would hang."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)


def images_per_second(run, count, device, repeats=5):
    """Images per second of `run()` (`count` images): two warm-up calls, then `repeats` timed ones, synchronised."""
    import time
    synchronize = dict(cuda=torch.cuda.synchronize, mps=lambda: torch.mps.synchronize()).get(device.type, lambda: None)
    run(), run()
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize()
    return repeats * count / (time.perf_counter() - started)
