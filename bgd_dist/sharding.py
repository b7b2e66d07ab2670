"""Which items, with which augmentation seeds, each shard of a data stream gets.

Every adapter draws its three streams from these functions and only maps an
item index (and an augmentation seed) to pixels, so every task shards the same
way and a shard's content depends on nothing but its arguments:

- **calibration** (:func:`calibration_items`): a seeded permutation of the
  ``n_available`` items, cut to ``n_images``. When more images are asked for
  than exist, the permutation is *cycled*: position ``p`` takes item
  ``order[p % n_available]``, each position with its own augmentation seed
  (:func:`item_seed`), so a repeated image is a fresh augmentation of it.
  Shard ``i`` of ``n`` takes positions ``i, i + n, ...``: shards are disjoint
  and their union is the ``n_images`` positions. ``start`` shifts the positions
  to ``start .. start + n_images - 1`` of the same stream: the held-out images
  of ``quantize.holdout`` are the positions after the fitted ones (disjoint
  positions; a cycled stream may show an image again, as a fresh augmentation).
- **training** (:func:`train_items`, distillation): an endless sequence of
  global batches of ``batch_size * n_shards`` items drawn uniformly with
  replacement, with their augmentation seeds. Global step ``k``'s batch is a
  function of ``(seed, k)`` alone (its own generator), so a resumed phase
  starts at step ``k`` without drawing steps ``0 .. k-1``; shard ``i`` keeps
  slice ``i`` of it, so the union over shards does not depend on the number of
  workers.
- **evaluation** (:func:`eval_items`): all items, or a fixed seeded subset of
  ``max_images`` kept in index order (so every class or image group stays
  represented); shard ``i`` takes every ``n``-th of them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

SEED_MOD = 2 ** 62


def check_shard(shard: int, n_shards: int) -> None:
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards} does not exist")


def item_seed(seed: int, position: int) -> int:
    """The augmentation seed of the item at ``position`` of a stream seeded with ``seed``."""
    return (seed * 1_000_003 + position * 7_919 + 17) % SEED_MOD


def step_seed(seed: int, step: int) -> int:
    """The seed of global training step ``step`` of a stream seeded with ``seed``."""
    return (seed * 7_919 + 1 + step * 1_000_000_007) % SEED_MOD


def calibration_items(n_available: int, shard: int, n_shards: int, n_images: int,
                      seed: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """``(indices, augmentation seeds)`` of this shard's calibration items (int64 tensors), at
    stream positions ``start .. start + n_images - 1``."""
    check_shard(shard, n_shards)
    if n_available < 1:
        raise ValueError("no images to calibrate on")
    if start < 0:
        raise ValueError(f"calibration stream position {start} < 0")
    order = torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))
    mine = start + torch.arange(n_images)[shard::n_shards]
    seeds = torch.tensor([item_seed(seed, int(p)) for p in mine], dtype=torch.int64)
    return order[mine % n_available], seeds


def train_step_items(n_available: int, shard: int, n_shards: int, batch_size: int, seed: int,
                     step: int) -> tuple[Tensor, Tensor]:
    """``(indices, augmentation seeds)`` of this shard's slice of global step ``step``'s batch."""
    check_shard(shard, n_shards)
    if n_available < 1:
        raise ValueError("no images to train on")
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    total = batch_size * n_shards
    idx = torch.randint(n_available, (total,), generator=gen)
    seeds = torch.randint(SEED_MOD, (total,), generator=gen)
    part = slice(shard * batch_size, (shard + 1) * batch_size)
    return idx[part], seeds[part]


def train_items(n_available: int, shard: int, n_shards: int, batch_size: int, seed: int,
                start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(indices, augmentation seeds)`` of this shard's slice of each global batch,
    from global step ``start_step`` on."""
    check_shard(shard, n_shards)
    step = start_step
    while True:
        yield train_step_items(n_available, shard, n_shards, batch_size, seed, step)
        step += 1


def eval_items(n_available: int, shard: int, n_shards: int, max_images: int | None) -> Tensor:
    """This shard's evaluation items (int64 indices, increasing)."""
    check_shard(shard, n_shards)
    if max_images is not None and max_images < n_available:
        chosen = torch.randperm(n_available, generator=torch.Generator().manual_seed(0))[:max_images]
        indices = chosen.sort().values
    else:
        indices = torch.arange(n_available)
    return indices[shard::n_shards]


def chunks(items: Sequence | Tensor, batch_size: int) -> Iterator:
    """Consecutive slices of at most ``batch_size`` items."""
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]
