"""Statistics across processes with `torch.distributed` (``torchrun``, ``accelerate launch``); no-ops in one process."""

import os

import torch
import torch.distributed as dist


def init_from_environment() -> None:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1): NCCL with one GPU per process, else gloo."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or ``op="max"``) ``tensor`` over all processes, in place; returns it. A host tensor goes through the
    process's GPU where the group is NCCL's, which reduces GPU tensors only."""
    if dist.is_initialized():
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, op=reduce_op)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=reduce_op)
    return tensor
