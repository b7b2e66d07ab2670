"""Calibration on natural photographs instead of the task's own images.

Many users have no in-domain images to spare, or only images of another kind.
``data.calibration: photos`` (digits and detection adapters) replaces each
calibration image by a random crop of one of the natural photographs that ship
with scikit-learn (``sklearn.datasets.load_sample_images``: two 427x640 RGB
photographs), so how much the end metric moves measures the method's
robustness to out-of-domain calibration data without any download. A crop is
a function of the calibration item's augmentation seed alone, so the images a
shard sees do not depend on the number of shards.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

CALIBRATION_SOURCES = ("task", "photos")


@lru_cache(maxsize=1)
def _photographs() -> tuple[Tensor, ...]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise RuntimeError("data.calibration: photos needs scikit-learn (its sample photographs); "
                           "pip install scikit-learn") from None
    return tuple(torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255) for img in load_sample_images().images)


def photo_crop(seed: int, height: int, width: int, grey: bool = False, scale: tuple[float, float] = (0.05, 0.5)) -> Tensor:
    """A ``(C, height, width)`` crop in [0, 1] (C = 1 with ``grey``, else 3) of one photograph:
    the photograph, the box (area share in ``scale``, the output's aspect ratio) and a
    horizontal flip drawn from ``seed``; resampled bilinearly (antialiased)."""
    gen = torch.Generator().manual_seed(int(seed))
    photos = _photographs()
    photo = photos[int(torch.randint(len(photos), (), generator=gen))]
    _, ph, pw = photo.shape
    share = float(torch.empty(()).uniform_(*scale, generator=gen))
    aspect = width / height
    h = max(1, min(ph, round((share * ph * pw / aspect) ** 0.5)))
    w = max(1, min(pw, round(h * aspect)))
    y = int(torch.randint(ph - h + 1, (), generator=gen))
    x = int(torch.randint(pw - w + 1, (), generator=gen))
    crop = photo[:, y:y + h, x:x + w]
    if bool(torch.randint(2, (), generator=gen)):
        crop = crop.flip(2)
    if grey:
        crop = (crop * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    return F.interpolate(crop[None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)
