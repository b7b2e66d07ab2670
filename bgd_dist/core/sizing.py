"""The paper's size accounting (METHOD.md §5), a pure function of a model and a plan.

MB = 2**20 bytes. Compressed = indexes (log2(K)/d bits per weight of every
quantized layer) + centroids (K*d values in fp16) + every other *parameter* at
fp32. Uncompressed = all parameters at fp32. Buffers (BN running statistics)
are not counted, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

MB = 2 ** 20


@dataclass(frozen=True)
class LayerSize:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    block_size: int | None
    n_centroids: int | None
    n_weights: int
    index_bytes: float
    centroid_bytes: float
    bits_per_weight: float
    skip: bool

    @property
    def nbytes(self) -> float:
        return self.index_bytes + self.centroid_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["mb"] = self.nbytes / MB
        return d


@dataclass(frozen=True)
class SizeReport:
    uncompressed_bytes: float
    compressed_bytes: float
    other_bytes: float
    layers: tuple[LayerSize, ...]

    @property
    def uncompressed_mb(self) -> float:
        return self.uncompressed_bytes / MB

    @property
    def compressed_mb(self) -> float:
        return self.compressed_bytes / MB

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / self.compressed_bytes

    def to_dict(self) -> dict:
        return {"uncompressed_mb": self.uncompressed_mb, "compressed_mb": self.compressed_mb,
                "ratio": self.ratio, "other_mb": self.other_bytes / MB,
                "layers": [l.to_dict() for l in self.layers]}


def index_bits(n_centroids: int) -> float:
    """Bits per index in the paper's accounting: log2(K)."""
    return math.log2(n_centroids)


def layer_size(name: str, geometry, block_size: int | None, n_centroids: int | None, skip: bool) -> LayerSize:
    n_weights = geometry.n_weights
    if skip:
        return LayerSize(name, geometry.kind, tuple(geometry.weight_shape), None, None, n_weights, 0.0, 0.0,
                         32.0, True)
    n_sub = geometry.n_subvectors(block_size, name)
    index_bytes = n_sub * index_bits(n_centroids) / 8
    centroid_bytes = n_centroids * block_size * 2
    bits = (index_bytes + centroid_bytes) * 8 / n_weights
    return LayerSize(name, geometry.kind, tuple(geometry.weight_shape), block_size, n_centroids, n_weights,
                     index_bytes, centroid_bytes, bits, False)


def size_report(model: nn.Module, plan) -> SizeReport:
    """Sizes of ``model`` compressed under ``plan`` (a :class:`bgd_dist.plan.Plan`).

    Works on dense and on already-quantized models: a quantized layer's
    parameters are replaced by its planned weight in the count.
    """
    planned = {l.name for l in plan.layers}
    total_params = 0
    other_params = 0
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if module_name in planned and pname in ("weight", "centroids"):
                continue  # counted from the plan below
            total_params += p.numel()
            other_params += p.numel()
    layers = tuple(layer_size(l.name, l.geometry, l.block_size, l.n_centroids, l.skip) for l in plan.layers)
    for l in layers:
        total_params += l.n_weights
        if l.skip:
            other_params += l.n_weights
    compressed = sum(l.nbytes for l in layers) + other_params * 4
    return SizeReport(total_params * 4, compressed, other_params * 4, layers)
