"""DistributedDataParallel helpers for `torchrun --nproc_per_node=N` (gloo on CPU, nccl on CUDA).

Conventions of the training loop under DDP:

- `--batch-size` is per process; the ranks' batches together form one joint batch (every rank
  draws the same shuffle permutation and takes the samples `rank::world_size`, see
  `strategies.iterate_batches`), and DDP averages the gradients, so one step equals one process
  training on the joint batch, as long as no layer mixes samples across the batch. BatchNorm does:
  each rank normalises with its own batch statistics (`sync_bn=True` converts BN layers to
  `nn.SyncBatchNorm`, which needs CUDA).
- `random_step` draws t* from a generator seeded identically on every rank and advanced once per
  batch on every rank, so all ranks run the same steps.
- Only rank 0 prints, writes logs and saves checkpoints. The augmentation generator differs per
  rank: at each save every rank's state is gathered (`all_gather_states`) and stored as
  `augment@rank<r>`, and a resumed rank r continues its own stream, so a resume is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DistInfo",
    "all_gather_states",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "init_distributed",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world_size, local_rank; `is_main` for rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # True when init_distributed created the process group (so cleanup destroys it); a group
    # the caller made before stays theirs.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an int, got {raw!r}") from e


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any.

    Reads WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 it initialises torch.distributed
    (nccl for CUDA devices, gloo otherwise) from MASTER_ADDR/MASTER_PORT and, on CUDA, selects the
    device `cuda:LOCAL_RANK`. Without them (a plain `python` run) it returns a single-process info.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():  # the caller's group: its rank and size are the truth
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, owns_group=True)


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo, sync_bn: bool = False):
    """`DistributedDataParallel(model)` when running distributed, else the model unchanged."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (nn.SyncBatchNorm does not run on CPU)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else info.local_rank]
    # Unused parameters occur legitimately: e.g. at step 0 a Mem-BN neuron has no membrane, so
    # its decay takes no part in that step's graph.
    return DDP(
        model, device_ids=ids if device.type == "cuda" else None, find_unused_parameters=True
    )


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a list of numbers over the ranks (identity when not distributed)."""
    if not info.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_states(gen: torch.Generator, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's state of its generator `gen`, in rank order (on every rank): for state that
    differs per rank (augmentation) in a checkpoint only rank 0 writes."""
    if not info.enabled:
        return [gen.get_state()]
    import torch.distributed as dist

    out: list = [None] * info.world_size
    dist.all_gather_object(out, gen.get_state())
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group if `init_distributed` created it (safe to call when not
    distributed; a group the caller created before is left for the caller to destroy)."""
    if info.enabled and info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
            # Free the group's C++ objects (gloo's worker threads) now, while the interpreter
            # is whole: left to its finalisation, their teardown sometimes aborted a rank
            # ("terminate called without an active exception", SIGABRT) after its work was done.
            import gc

            gc.collect()
