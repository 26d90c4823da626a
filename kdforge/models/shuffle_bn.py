"""Shuffling BN for the MoCo key encoder (He et al., MoCo, CVPR 2020, §3.3).

BatchNorm statistics computed over the same group of samples for the query and for its positive
key let the model "cheat" the pretext task. MoCo encodes the keys on a *shuffled* batch: gather the
images of all ranks (B = N · world), draw one permutation on rank 0 and broadcast it, let every rank
encode its contiguous slice of the permuted batch (so its BN statistics come from other samples than
its queries'), gather the keys and undo the permutation.

Under ``torch.distributed`` the functions below do exactly that. In a single process the
same idea is emulated with ``splits`` groups: the query batch is encoded in ``splits`` contiguous
chunks and the key batch in ``splits`` chunks of a random permutation, so BN statistics of a key
come from a different group of samples than its query's (the ``SplitBatchNorm`` trick of the
official MoCo CIFAR demo, done without touching the model). ``splits = 1`` is a plain forward.

All ops follow the input's device; gathers carry no gradient (keys never need one).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from kdforge.engine.distributed import all_gather_cat, get_rank, get_world_size, is_dist


def _check_splits(n: int, splits: int) -> None:
    if splits < 1 or n % splits != 0:
        raise ValueError(f"shuffle-BN: the per-rank batch ({n}) must be divisible by bn_splits ({splits})")


@torch.no_grad()
def broadcast_permutation(n: int, device: torch.device, src: int = 0) -> Tensor:
    """``randperm(n)`` drawn on rank ``src`` (global torch RNG) and broadcast to all ranks — (n,) long."""
    perm = torch.randperm(n, device="cpu").to(device) if get_rank() == src else torch.empty(n, dtype=torch.long,
                                                                                          device=device)
    if is_dist():
        dist.broadcast(perm, src=src)
    return perm


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """Gather ``x`` (N, …) from all ranks (B = N·world rows), permute with a broadcast permutation and
    return ``(this rank's slice of the permuted batch (N, …), unshuffle index (B,))``.

    Single process: ``(x[perm], argsort(perm))``."""
    x_all = all_gather_cat(x)
    b, world = x_all.shape[0], get_world_size()
    perm = broadcast_permutation(b, x.device)
    idx_unshuffle = torch.argsort(perm)
    idx_this = perm.view(world, -1)[get_rank()]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(y: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Inverse of :func:`batch_shuffle_ddp`: gather ``y`` (N, …) from all ranks, restore the original
    global order with ``idx_unshuffle`` (B,) and return this rank's rows (N, …)."""
    y_all = all_gather_cat(y)
    world = get_world_size()
    idx_this = idx_unshuffle.view(world, -1)[get_rank()]
    return y_all[idx_this]


def chunked_forward(encoder: Callable[[Tensor], Tensor], x: Tensor, splits: int = 1) -> Tensor:
    """``cat([encoder(c) for c in x.chunk(splits)])`` — per-group BN statistics in one process.
    x (N, …) with N divisible by ``splits``; gradients flow."""
    _check_splits(x.shape[0], splits)
    if splits == 1:
        return encoder(x)
    return torch.cat([encoder(c) for c in x.chunk(splits)], dim=0)


@torch.no_grad()
def shuffled_forward(encoder: Callable[[Tensor], Tensor], x: Tensor, splits: int = 1) -> Tensor:
    """Encode ``x`` (N, …) on a shuffled batch and return the outputs in the original order (N, …).

    Distributed: :func:`batch_shuffle_ddp` → ``encoder`` → :func:`batch_unshuffle_ddp` (each rank's
    BN sees a random slice of the global batch). Single process: permute locally, encode in
    ``splits`` groups (:func:`chunked_forward`), un-permute. No gradient (the key encoder)."""
    _check_splits(x.shape[0], splits)
    if is_dist() and get_world_size() > 1:
        xs, idx = batch_shuffle_ddp(x)
        return batch_unshuffle_ddp(chunked_forward(encoder, xs, splits), idx)
    perm = torch.randperm(x.shape[0], device="cpu").to(x.device)
    y = chunked_forward(encoder, x[perm], splits)
    return y[torch.argsort(perm)]
