"""Where and how a script runs: the device, the precision, torchrun's processes, compiled blocks, loader workers."""

import os

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
    """bf16 autocast on CUDA when supported ('auto'), fp32 elsewhere unless bf16 is asked for explicitly."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise UserError("this GPU does not support bf16; use --precision fp32")
        return None
    return torch.bfloat16


class Distributed:
    """torchrun's environment, or a single process. NCCL on CUDA, gloo on CPU."""

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.enabled = self.world_size > 1
        device = select_device(device_name)
        if device.type == "cuda" and self.enabled:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag):
        """True on every rank if `flag` is true on any rank (keeps the ranks stepping in lockstep)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def all_gather(self, tensor):
        """tensor [n, ...] (the same shape on every rank) -> [world_size * n, ...] on the CPU, rank 0's rows first."""
        device = self.device if self.device.type == "cuda" else "cpu"   # gloo gathers CPU tensors, NCCL CUDA ones
        pieces = [torch.empty_like(tensor, device=device) for _ in range(self.world_size)]
        torch.distributed.all_gather(pieces, tensor.to(device).contiguous())
        return torch.cat(pieces).cpu()


def compile_transformer_blocks(model):
    """torch.compile every transformer block in place (where nearly all the FLOPs are), not the whole model.

    The masking step turns the mask ratio, a Python float that changes at every step of a progressive schedule,
    into a token count; a compiled whole model would recompile at each new ratio (and give up after eight). The
    blocks only see tensors whose length varies, which dynamic shapes handle without recompiling.
    """
    for module in model.modules():
        if isinstance(module, lmd.Block):
            module.compile(dynamic=True)
    return model


def loader_workers(requested=None):
    """Image-loading processes: the requested number, or one per core but one (for the training loop), at most 8."""
    return requested if requested is not None else min(8, max((os.cpu_count() or 2) - 1, 0))
