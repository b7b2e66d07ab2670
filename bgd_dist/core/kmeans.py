"""k-means under a d x d metric: one codebook per layer (METHOD.md §2).

Pure functions over tensors; device and dtype follow the weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .layouts import LayerGeometry, from_subvectors, to_subvectors

INITS = ("random", "kmeans++")


@dataclass(frozen=True)
class Codebook:
    """The result of fitting one layer.

    centroids: (n_centroids, block_size); assignments: (n_subvectors,) int64 in
    the reference's unrolled order; objective: the relative objective
    ``Σ_i (w_i - c_a(i))ᵀ G (w_i - c_a(i)) / Σ_i w_iᵀ G w_i`` after each
    assignment step (``n_iter + 1`` values, the last one for the returned
    codebook).
    """

    centroids: Tensor
    assignments: Tensor
    objective: tuple[float, ...]
    n_empty_repaired: int = 0

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def block_size(self) -> int:
        return self.centroids.shape[1]

    def decode(self, geometry: LayerGeometry, name: str = "<layer>") -> Tensor:
        return from_subvectors(self.centroids[self.assignments], geometry, self.block_size, name)


def clamp_n_centroids(n_centroids: int, n_subvectors: int) -> int:
    """K = min(K, largest power of two strictly below n_subvectors / 4) (reference rule).

    Layers too small for the rule (n_subvectors <= 4) keep one centroid.
    """
    if n_centroids < 1:
        raise ValueError(f"n_centroids must be >= 1, got {n_centroids}")
    bound = n_subvectors / 4
    power = 1
    while power * 2 < bound:
        power *= 2
    return min(n_centroids, power)


def _check_finite(t: Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"layer {name!r}: {what} contains NaN or inf")


def _assign(w: Tensor, centroids: Tensor, metric: Tensor, chunk: int = 32768) -> tuple[Tensor, Tensor]:
    """argmin_c (w - c)ᵀ G (w - c) for each row of w; returns (assignments, distance)."""
    cg = centroids @ metric                       # (K, d)
    c_norm = (centroids * cg).sum(1)              # (K,)
    w_norm = ((w @ metric) * w).sum(1)            # (N,)
    out_a, out_d = [], []
    for start in range(0, w.shape[0], chunk):
        wc = w[start:start + chunk]
        scores = torch.addmm(c_norm.unsqueeze(0), wc, cg.T, alpha=-2.0)   # (n, K)
        best, idx = scores.min(1)
        out_a.append(idx)
        out_d.append((best + w_norm[start:start + chunk]).clamp_min(0))
    return torch.cat(out_a), torch.cat(out_d)


def _kmeanspp(w: Tensor, k: int, metric: Tensor, gen: torch.Generator) -> Tensor:
    n = w.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    diff = w - w[first]
    best = ((diff @ metric) * diff).sum(1).clamp_min(0)
    for _ in range(1, k):
        total = float(best.sum())
        if total <= 0:
            # every remaining point coincides with a chosen centroid: take unused indexes
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            probs = (best / total).double().cpu()
            idx = int(torch.multinomial(probs, 1, generator=gen))
        chosen.append(idx)
        c = w[idx]
        d_new = (((w - c) @ metric) * (w - c)).sum(1).clamp_min(0)
        best = torch.minimum(best, d_new)
    return w[torch.tensor(chosen, device=w.device)].clone()


def _update(w: Tensor, assignments: Tensor, k: int) -> tuple[Tensor, Tensor]:
    sums = torch.zeros(k, w.shape[1], dtype=w.dtype, device=w.device).index_add_(0, assignments, w)
    counts = torch.bincount(assignments, minlength=k)
    return sums, counts


def _repair_empty(w: Tensor, assignments: Tensor, counts: Tensor, centroids: Tensor) -> tuple[Tensor, int]:
    """Split the most populated cluster for every empty one. Bounded: one pass.

    The points of the largest cluster are ordered along their direction of
    largest spread and the upper half is moved to the empty cluster, whose
    centroid first takes the largest cluster's value; the objective is
    unchanged by the move and can only decrease at the following M-step.
    Returns (new assignments, number of clusters repaired).
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return assignments, 0
    assignments = assignments.clone()
    counts = counts.clone()
    repaired = 0
    for e in empty:
        big = int(torch.argmax(counts))
        if int(counts[big]) < 2:
            break  # nothing left to split: fewer distinct centroids than requested
        members = torch.nonzero(assignments == big).flatten()
        pts = w[members]
        spread = pts - pts.mean(0)
        axis = int(torch.argmax(spread.pow(2).sum(0)))
        order = torch.argsort(spread[:, axis], stable=True)
        moved = members[order[order.shape[0] // 2:]]
        assignments[moved] = e
        centroids[e] = centroids[big]
        counts[e] = moved.shape[0]
        counts[big] -= moved.shape[0]
        repaired += 1
    return assignments, repaired


def fit_codebook(
    weight: Tensor,
    geometry: LayerGeometry,
    metric: Tensor | None,
    n_centroids: int,
    block_size: int,
    n_iter: int = 100,
    init: str = "random",
    seed: int = 0,
    name: str = "<layer>",
) -> Codebook:
    """k-means of the layer's subvectors under ``metric`` (d x d, PSD; None = identity).

    weight: the layer's weight, shape ``geometry.weight_shape``; the fit runs in
    the weight's dtype and on its device. ``n_centroids`` is used as given (apply
    :func:`clamp_n_centroids` before, as the plan does). Terminates after exactly
    ``n_iter`` iterations; empty clusters are repaired by a bounded split.
    """
    if n_centroids < 1:
        raise ValueError(f"layer {name!r}: n_centroids must be >= 1, got {n_centroids}")
    if init not in INITS:
        raise ValueError(f"layer {name!r}: unknown init {init!r}; expected one of {INITS}")
    if tuple(weight.shape) != tuple(geometry.weight_shape):
        raise ValueError(f"layer {name!r}: weight shape {tuple(weight.shape)} != geometry {geometry.weight_shape}")
    _check_finite(weight, "the weight", name)
    w = to_subvectors(weight.detach(), geometry, block_size, name).contiguous()
    if not w.is_floating_point():
        raise ValueError(f"layer {name!r}: weight must be floating point, got {w.dtype}")
    if metric is None:
        metric = torch.eye(block_size, dtype=w.dtype, device=w.device)
    if tuple(metric.shape) != (block_size, block_size):
        raise ValueError(f"layer {name!r}: metric shape {tuple(metric.shape)} != ({block_size}, {block_size})")
    _check_finite(metric, "the statistics", name)
    metric = metric.to(device=w.device, dtype=w.dtype)
    metric = (metric + metric.T) / 2
    n = w.shape[0]
    n_distinct = torch.unique(w, dim=0).shape[0]
    k = n_centroids
    if k > n_distinct:
        warnings.warn(
            f"layer {name!r}: {k} centroids requested but only {n_distinct} distinct subvectors; "
            f"the codebook will contain duplicate centroids",
            stacklevel=2,
        )
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        if k <= n:
            idx = torch.randperm(n, generator=gen)[:k]
        else:
            idx = torch.cat([torch.randperm(n, generator=gen), torch.randint(n, (k - n,), generator=gen)])
        centroids = w[idx.to(w.device)].clone()
    else:
        centroids = _kmeanspp(w, k, metric, gen)
    total = float(((w @ metric) * w).sum())
    scale = total if total > 0 else 1.0

    objective: list[float] = []
    repaired = 0
    for it in range(n_iter + 1):
        assignments, dist = _assign(w, centroids, metric)
        objective.append(float(dist.sum()) / scale)
        if it == n_iter:
            break
        counts = torch.bincount(assignments, minlength=k)
        assignments, n_rep = _repair_empty(w, assignments, counts, centroids)
        repaired += n_rep
        sums, counts = _update(w, assignments, k)
        nonempty = counts > 0
        centroids = torch.where(nonempty.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).to(w.dtype),
                                centroids)
    return Codebook(centroids, assignments, tuple(objective), repaired)


def relative_error(weight: Tensor, decoded: Tensor) -> float:
    """``||W - Ŵ||² / ||W||²`` (weights-only diagnostic)."""
    num = float((weight - decoded).pow(2).sum())
    den = float(weight.pow(2).sum())
    return num / den if den > 0 else math.inf if num > 0 else 0.0
