"""torchrun set-up, rank-0 helpers and reductions.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) every process joins one process
group: NCCL when CUDA is available, gloo otherwise. Launched without torchrun, the same code runs
as a single process and every helper here degrades to a no-op.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} on this node has no GPU ({torch.cuda.device_count()} "
                            "visible); lower NPROC_PER_NODE")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistInfo(rank, world_size, local_rank, local_world_size, device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (from torchrun's environment before the group is initialised)."""
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes, in place; returns the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over all processes, in place; returns the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[world_size, *shape]: every process's `tensor`, in rank order."""
    if not is_dist():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def all_gather_object(obj) -> list:
    """Every process's `obj`, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0):
    """Give every process rank `src`'s buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of every forward, so after the last training iteration each
    process holds statistics updated with its own shard. nn.DataParallel, which the original used,
    keeps those of the first device; doing the same before validation and saving makes every rank
    validate the very model that is saved.
    """
    if is_dist():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def cleanup(together: bool = True):
    """Leave the process group; a gloo process that exits without doing so may abort on the way
    out ("terminate called without an active exception", exit code -6). `together=False`, for a
    process that leaves on its own error while the others may wait in a collective: a NCCL group
    is left as it is, as its shutdown may wait for them (torchrun ends them)."""
    if is_dist() and (together or dist.get_backend() == "gloo"):
        dist.destroy_process_group()
