"""Running under torchrun: detection, process groups and the few collectives flatcli needs.

Launched as ``torchrun --nproc_per_node=P -m flatcli ...``, every process finds RANK, WORLD_SIZE and
LOCAL_RANK in its environment; flatcli then joins a process group (NCCL on CUDA, one GPU per local rank;
Gloo on CPU) with a timeout on every collective, so a rank that dies or stalls brings the job down with a
clear message instead of a hang. Without torchrun nothing here does anything.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatcli.errors import FlatcliError

TIMEOUT_ENV = "FLATCLI_DIST_TIMEOUT"   # seconds a collective may wait for the other ranks (default 600)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job."""
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup(device: torch.device) -> tuple[Dist | None, torch.device]:
    """Join the torchrun job if there is one; returns (None, device) otherwise.

    Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``; the backend is NCCL there and Gloo on the CPU.
    """
    if not launched_by_torchrun():
        return None, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise FlatcliError(f"torchrun on {device.type} is not supported", "use --device cuda or --device cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank, world, local), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, with ONE collective on a flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(dist.all_reduce, flat)
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable: tensors, numbers, dicts), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    collective(dist.all_gather_object, out, obj)
    return out


def broadcast(obj, src: int = 0):
    box = [obj]
    collective(dist.broadcast_object_list, box, src=src)
    return box[0]


def collective(fn, *args, **kwargs):
    """Run a collective; a rank that does not answer in time becomes a clear error, not a hang."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise FlatcliError(f"rank {rank}: another rank failed or stopped answering ({str(e).splitlines()[0][:160]})",
                           f"see the other ranks' messages; raise {TIMEOUT_ENV} (seconds) if a rank is just slow") from None
