"""What crosses the executor boundary (driver <-> workers, Ray actors and tasks): plain,
picklable dataclasses of tensors and numbers, nothing that relies on hooks or closures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .core.kmeans import Codebook
from .core.layouts import LayerGeometry


# -- statistics -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRequest:
    """The statistics of one layer: its geometry, the block size they are pooled at, their type
    (``gram``, ``hessian`` or ``identity``; see :mod:`bgd_dist.objectives`)."""

    name: str
    geometry: LayerGeometry
    block_size: int
    stats: str


@dataclass(frozen=True)
class CollectRequest:
    """Statistics of ``layers`` over ``n_images`` calibration images (split over the shards),
    streamed through the workers' current student ``batch_size`` at a time. ``start``: the
    position in the calibration stream the images start at (0; the held-out images of
    ``quantize.holdout`` start after the fitted ones). ``force``: a regular expression; the
    student's modules it fully matches return the teacher's outputs (``quantize.teacher_forcing``;
    the teacher then runs on every batch)."""

    layers: tuple[LayerRequest, ...]
    n_images: int
    batch_size: int
    seed: int
    start: int = 0
    force: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class ShardStats:
    """One shard's statistics (``{name: stats.state()}``), as a worker returns them."""

    states: dict
    n_images: int
    seconds: float
    data_seconds: float = 0.0   # of ``seconds``, the time spent waiting for batches (reading, decoding images)


@dataclass(frozen=True)
class CollectResult:
    """The shards' statistics merged in shard order: ``{name: stats object}``."""

    stats: dict
    n_images: int
    seconds: float          # the sum over the shards of their collection time
    data_seconds: float = 0.0   # of which waiting for batches (reading and decoding images)
    shard_rates: tuple = ()     # images per second of each shard's worker, in shard order

    @property
    def images_per_s(self) -> float:
        """Images per second of one worker (the mean over the shards)."""
        return sum(self.shard_rates) / len(self.shard_rates) if self.shard_rates else 0.0

    @property
    def data_share(self) -> float:
        """The share of the workers' collection time spent waiting for batches."""
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def nbytes(self) -> int:
        """What one worker holds (the statistics of every requested layer)."""
        return sum(st.nbytes for st in self.stats.values())


@dataclass(frozen=True)
class OutputMomentsRequest:
    """Per-channel moments of the *outputs* of ``layers`` (dimension 1), on the teacher and on the
    current student run on the same ``n_images`` calibration images (bias correction); ``force``:
    as in :class:`CollectRequest`."""

    layers: tuple[str, ...]
    n_images: int
    batch_size: int
    seed: int
    force: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class ShardOutputMoments:
    """One shard's output moments: ``{name: ChannelMoments.state()}`` of the teacher and of the student."""

    teacher: dict
    student: dict
    n_images: int
    seconds: float


@dataclass(frozen=True)
class OutputMoments:
    """The shards' output moments merged in shard order: ``{name: ChannelMoments}`` for each model."""

    teacher: dict
    student: dict
    n_images: int
    seconds: float


# -- codebooks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    """The k-means settings shared by every layer of a run (``quantize.*``)."""

    n_iter: int = 100
    init: str = "random"
    refine: str = "hartigan"
    hessian_rounds: int = 4            # the hessian objective only (quantize.hessian.*)
    hessian_damp: float | str = 0.01   # a number, or auto (per layer, bgd_dist.objectives.layer_damp)
    hessian_cg_steps: int = 20
    kmeans_backend: str = "torch"      # the E-step's nearest-centroid search: torch | faiss
    restarts: int = 1                  # fits from distinct initialisations; the lowest final objective is kept

    @classmethod
    def of(cls, quantize_cfg, n_iter: int | None = None) -> "FitSettings":
        q = quantize_cfg
        return cls(q.n_iter if n_iter is None else n_iter, q.init, q.refine, q.hessian.rounds, q.hessian.damp,
                   q.hessian.cg_steps, q.kmeans_backend, q.restarts)


@dataclass(frozen=True)
class FitJob:
    """One codebook fit: the layer, its weight and metric (``d x d`` or None for ``paper`` and
    ``weights``, ``L x L`` for ``hessian``), its (d, K) and seed, and the shared settings."""

    name: str
    weight: torch.Tensor
    geometry: LayerGeometry
    metric: torch.Tensor | None
    n_centroids: int
    block_size: int
    seed: int = 0
    objective: str = "paper"
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass(frozen=True)
class FitResult:
    name: str
    codebook: Codebook
    seconds: float
    restart_objectives: tuple[float, ...] = ()   # each restart's final objective (more than one restart)


# -- distillation -----------------------------------------------------------------------------------
# A distillation phase crosses the executor boundary as bgd_dist.finetune.PhaseSpec (what to run)
# and bgd_dist.finetune.PhaseState (where a piece of it ended: centroids, momentum, BN buffers, losses).
