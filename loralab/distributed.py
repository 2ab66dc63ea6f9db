"""Data-parallel training through PyTorch's own engine (DDP), started by torchrun.

    torchrun --nproc_per_node 2 -m loralab.cli train ...      # gloo on CPU, nccl on CUDA

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `setup()` joins the process
group when WORLD_SIZE > 1 and is a no-op otherwise, so the same script runs on one process or many.

Every rank holds the whole model; DDP all-reduces (averages) the gradients of the trainable parameters
only (the frozen base sends nothing).  Each optimizer step takes one global batch of
batch_size × grad_accum × world_size examples; rank r computes micro-batches r, r + world, ... of it.
The loss is a sum over the step's targets divided by the number of targets in the whole global batch
(all-reduced first), so DDP, gradient accumulation and one big batch give the same gradient.

FSDP: adapters are tiny, so DDP is the right tool until the frozen base no longer fits on one device.
Then add the adapters, shard the model with FSDP2 and call `train` as usual; it sees the sharded model and
does not wrap it in DDP (frozen and trainable parameters may share a block under FSDP2):

    add_lora(model, config)
    for block in model.model.layers:
        torch.distributed.fsdp.fully_shard(block)
    torch.distributed.fsdp.fully_shard(model)
    train(model, data, None, TrainConfig(..., save_every=None))
    adapters = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}  # on every rank

Checkpoints of a sharded model are not written (save_every must be None).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["setup", "rank", "world_size", "is_main", "all_reduce_sum", "barrier", "wrap", "is_sharded",
           "gather_rng_states", "gather_cuda_rng_states"]


def setup() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl with CUDA); no-op for one process."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(_leave)


def _leave() -> None:
    """Leave the process group before the interpreter exits: a gloo group destroyed only with the process
    can abort it (std::terminate from a still-joinable worker thread), seen intermittently here."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files, shows progress and prints."""
    return rank() == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """DDP over the trainable parameters when running on several processes; the model itself otherwise
    (or when it is already sharded with FSDP)."""
    if world_size() <= 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(model: nn.Module) -> bool:
    """True for a model (or one of its blocks) sharded with FSDP / FSDP2."""
    return any(type(m).__name__.startswith("FSDP") or type(m).__name__ == "FullyShardedDataParallel"
               for m in model.modules())


def gather_rng_states() -> list[torch.Tensor]:
    """Every rank's CPU RNG state (uint8 tensors), on every rank: a resumed run gives each rank its own."""
    return _all_gather(torch.get_rng_state())


def gather_cuda_rng_states() -> list[torch.Tensor] | None:
    """Every rank's CUDA RNG state (of its current device, the one it trains on), on every rank;
    None without CUDA."""
    return _all_gather(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None


def _all_gather(state: torch.Tensor) -> list[torch.Tensor]:
    """[rank 0's state, rank 1's, ...] as CPU tensors (nccl gathers device tensors only)."""
    if world_size() <= 1:
        return [state]
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = [torch.empty_like(state, device=backend_device) for _ in range(world_size())]
    dist.all_gather(out, state.to(backend_device))
    return [t.cpu() for t in out]
