"""The seeds of a run, by name: every random choice of a pipeline derives from ``quantize.seed``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def fixed_init(seed: int = 0):
    """Build a model's random initialisation from ``seed`` without touching the caller's random
    state: every process that builds the same architecture without weights (the driver, each
    worker) gets the same model, whatever ran before it. Also a decorator. Under a meta-device
    context (a build whose values do not matter) it does nothing."""
    if torch.get_default_device().type == "meta":
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Seeds:
    base: int   # quantize.seed

    def collect(self, stage: int) -> int:
        """The calibration images (and their augmentations) of stage ``stage``."""
        return self.base * 1000 + stage

    def layerwise(self, stage: int) -> int:
        """The training stream of stage ``stage``'s layer-wise distillation."""
        return self.base * 1000 + stage

    def global_(self) -> int:
        """The training stream of the global distillation."""
        return self.base * 1000 + 999

    def allocation(self) -> int:
        """The calibration images of the size allocation (``quantize.target_mb``)."""
        return self.base * 1000 + 777

    def unfold(self) -> int:
        """The calibration images on which folded BatchNorm layers are re-estimated."""
        return self.base * 1000 + 888

    def permute(self) -> int:
        """The calibration images that scale the channel permutations (``quantize.permute``)."""
        return self.base * 1000 + 555

    def fit(self, layer) -> int:
        """The k-means initialisation of a layer (a plan entry)."""
        return self.base + layer.order


RESTART_STRIDE = 100_003   # a prime above any layer count: restarts never reuse another layer's seed


def restart_seed(seed: int, restart: int) -> int:
    """The k-means initialisation of restart ``restart`` of a fit seeded ``seed`` (``quantize.restarts``);
    restart 0 is the fit's own seed, so one restart is the fit without restarts."""
    return seed + RESTART_STRIDE * restart
