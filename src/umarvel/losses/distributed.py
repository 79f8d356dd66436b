"""Gathering embeddings across processes with an explicit gradient policy."""

from __future__ import annotations

import torch
import torch.distributed as dist

from umarvel.distributed import world


def world_size() -> int:

    return world().size


def gather_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (n, ...) from every rank along dim 0, in rank order.

    The copies received from other ranks carry no gradient; this rank's slot is the local tensor itself,
    so gradients flow back to the rows this rank computed. Every rank then holds the same global batch
    and computes the same loss; with DDP averaging gradients over ranks, scale the loss by the world
    size to get the gradient of a single process holding the whole batch.
    """
    size = world_size()
    if size == 1:
        return tensor
    received = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(received, tensor.detach().contiguous())
    received[dist.get_rank()] = tensor
    return torch.cat(received, dim=0)
