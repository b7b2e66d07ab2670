"""Image data for classification: ImageNet-style folders, deterministic shards and augmentations.

Three streams, as the adapter protocol needs them (:mod:`bgd_dist.adapters`):

- calibration: a seeded subset of ``n_images`` training images, shard ``i`` of
  ``n`` takes every ``n``-th of them (disjoint shards, union = the subset);
- training (distillation): an endless stream of global batches; every worker
  draws the same global batch of indices and loads only its slice, so the
  union over workers does not depend on the number of workers;
- evaluation: the labelled ``val/`` folder, centre crops, strided shards.

Augmentations are seeded per image (``(seed, position)``), not by the global
RNG of whichever process happens to load the image: the same shard gives the
same pixels in a Ray actor, in the driver and in a DataLoader worker. Labels
are returned by the evaluation stream only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SEED_MOD = 2 ** 62


# -- which images, in which shard -------------------------------------------------------------------
def item_seed(seed: int, position: int) -> int:
    """The augmentation seed of the image at ``position`` of a stream seeded with ``seed``."""
    return (seed * 1_000_003 + position * 7_919 + 17) % _SEED_MOD


def calibration_indices(n_available: int, shard: int, n_shards: int, n_images: int,
                        seed: int) -> tuple[Tensor, Tensor]:
    """``(indices, augmentation seeds)`` of this shard's calibration images.

    A seeded permutation of the ``n_available`` images, cut to ``n_images``
    (cycled with fresh augmentations when more images are asked for than
    exist); shard ``i`` of ``n`` takes positions ``i, i + n, ...``. Shards are
    disjoint and their union is the ``n_images`` positions.
    """
    _check_shard(shard, n_shards)
    if n_available < 1:
        raise ValueError("no images to calibrate on")
    order = torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(n_images)
    indices = order[positions % n_available]
    mine = positions[shard::n_shards]
    seeds = torch.tensor([item_seed(seed, int(p)) for p in mine], dtype=torch.int64)
    return indices[mine], seeds


def global_batches(n_available: int, shard: int, n_shards: int, batch_size: int,
                   seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(indices, augmentation seeds)`` of this shard's slice of each global batch.

    Every shard draws the same global batch of ``batch_size * n_shards`` indices
    (uniform with replacement, like :class:`bgd_dist.testing.ToyAdapter`) and
    keeps slice ``shard``: the union over shards is the same global batch
    whatever the number of workers.
    """
    _check_shard(shard, n_shards)
    if n_available < 1:
        raise ValueError("no images to train on")
    gen = torch.Generator().manual_seed(seed * 7_919 + 1)
    total = batch_size * n_shards
    while True:
        idx = torch.randint(n_available, (total,), generator=gen)
        seeds = torch.randint(_SEED_MOD, (total,), generator=gen)
        part = slice(shard * batch_size, (shard + 1) * batch_size)
        yield idx[part], seeds[part]


def eval_indices(n_available: int, shard: int, n_shards: int, max_images: int | None) -> Tensor:
    """This shard's evaluation images: all of them, or a fixed seeded subset of
    ``max_images`` (kept in folder order, so every class is represented)."""
    _check_shard(shard, n_shards)
    if max_images is not None and max_images < n_available:
        chosen = torch.randperm(n_available, generator=torch.Generator().manual_seed(0))[:max_images]
        indices = chosen.sort().values
    else:
        indices = torch.arange(n_available)
    return indices[shard::n_shards]


def _check_shard(shard: int, n_shards: int) -> None:
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards} does not exist")


# -- image folders ------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(root: str | Path, key: str, labelled: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, label)], classes)`` of an image folder.

    With class sub-folders (ImageNet ``train/`` / ``val/`` layout) labels are the
    sorted class index, as :class:`torchvision.datasets.ImageFolder` assigns
    them. Without sub-folders, a flat folder of unlabelled images (label -1)
    is accepted unless ``labelled``. ``key`` (``data.train``) names the setting
    in error messages.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise FileNotFoundError(f"{key}: {root} {what}; pass --set {key}=/path/to/images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: list[tuple[str, int]] = []
    if classes:
        for label, name in enumerate(classes):
            samples += [(str(p), label) for p in sorted((root / name).rglob("*")) if _is_image(p)]
    elif labelled:
        raise ValueError(f"{key}: {root} has no class sub-folders; evaluation needs the ImageFolder layout "
                         f"(one sub-folder of images per class)")
    else:
        samples = [(str(p), -1) for p in sorted(root.iterdir()) if _is_image(p)]
    if not samples:
        raise ValueError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return samples, classes


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class SeededImages(Dataset):
    """Images by key ``(index, augmentation seed)`` (or a plain index, seed 0).

    The transform runs with the global torch RNG forked and seeded with the
    item's seed, so torchvision's random transforms are reproducible per image
    and leave the caller's RNG untouched. Returns the image, or
    ``(image, label)`` with ``with_labels``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, with_labels: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[int(index)]
        image = load_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            x = self.transform(image)
        return (x, label) if self.with_labels else x


def loader(dataset: Dataset, keys: Iterator[list] | list[list], num_workers: int) -> DataLoader:
    """A DataLoader over explicit batches of keys (``batch_sampler``), in order."""
    return DataLoader(dataset, batch_sampler=keys, num_workers=num_workers,
                      persistent_workers=False, pin_memory=False)


def batches_of(keys: list, batch_size: int) -> list[list]:
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
