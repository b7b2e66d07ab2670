"""Image data for classification: ImageNet-style folders, deterministic shards and augmentations.

Three streams, as the adapter protocol needs them (:mod:`bgd_dist.adapters`);
which images (and augmentation seeds) each shard gets is the engine's rule
(:mod:`bgd_dist.sharding`):

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

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from bgd_dist.adapters import DataError
from bgd_dist.sharding import calibration_items, eval_items, item_seed, train_items  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# -- which images, in which shard: the engine's rule (bgd_dist.sharding) --------------------------------
calibration_indices = calibration_items     # (n_available, shard, n_shards, n_images, seed) -> (indices, seeds)
global_batches = train_items                # (n_available, shard, n_shards, batch_size, seed, start_step=0)
eval_indices = eval_items                   # (n_available, shard, n_shards, max_images) -> indices


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
    """The image at ``path`` in RGB; an unreadable, corrupt or truncated file is a
    :class:`~bgd_dist.adapters.DataError` naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e}); fix or remove the file, or set "
                        f"data.on_bad_image: skip to leave such files out") from None


class Skipped:
    """What :class:`SeededImages` returns for an unreadable image with ``skip_bad``."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


class SeededImages(Dataset):
    """Images by key ``(index, augmentation seed)`` (or a plain index, seed 0).

    The transform runs with the global torch RNG forked and seeded with the
    item's seed, so torchvision's random transforms are reproducible per image
    and leave the caller's RNG untouched. Returns the image, or
    ``(image, label)`` with ``with_labels``; an unreadable image is an error
    naming the file, or with ``skip_bad`` a :class:`Skipped` (see :func:`loader`).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, with_labels: bool = False,
                 skip_bad: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.with_labels = with_labels
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[int(index)]
        try:
            image = load_rgb(path)
        except DataError as e:
            if not self.skip_bad:
                raise
            return Skipped(path, str(e))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            x = self.transform(image)
        return (x, label) if self.with_labels else x


def _collate(items: list):
    """``(batch or None, [skipped paths])``: the readable items collated, the skipped ones named."""
    good = [x for x in items if not isinstance(x, Skipped)]
    return (default_collate(good) if good else None), [x.path for x in items if isinstance(x, Skipped)]


def loader(dataset: Dataset, keys: Iterator[list] | list[list], num_workers: int,
           skipped: set | None = None) -> Iterator:
    """Batches over explicit batches of keys (a DataLoader with ``batch_sampler``), in order.
    Images the dataset skipped are left out of their batch (a batch of only skipped images is
    left out), logged, and added to ``skipped``."""
    for batch, bad in DataLoader(dataset, batch_sampler=keys, num_workers=num_workers, collate_fn=_collate,
                                 persistent_workers=False, pin_memory=False):
        for path in bad:
            if skipped is None or path not in skipped:
                log.warning("%s: unreadable image skipped (data.on_bad_image: skip)", path)
            if skipped is not None:
                skipped.add(path)
        if batch is not None:
            yield batch


def batches_of(keys: list, batch_size: int) -> list[list]:
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
