"""The k-means E-step on faiss (``quantize.kmeans_backend: faiss``).

Under a PSD metric ``G = L Lᵀ`` (here from its eigendecomposition, so a singular
``G`` works too), ``(w - c)ᵀ G (w - c) = ||Lᵀw - Lᵀc||²``: the nearest centroid
under ``G`` is faiss' Euclidean nearest neighbour of the transformed rows. The
rows are transformed once per fit, the ``K`` centroids once per iteration;
faiss' exhaustive search (a blocked SGEMM fused with the row minimum) then
replaces the GEMM and argmin of :func:`bgd_dist.core.kmeans._nearest`.

Results: the search is exact up to float32 rounding, like the default one, and
``fit_codebook`` moves a subvector only when its new centroid is strictly closer
in float64, so the codebooks differ from the default backend's only where two
centroids tie within rounding. Each query row is searched independently, so
the result does not depend on faiss' thread count: it is the same across runs
and between the serial and Ray executors.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor


def faiss_search(w: Tensor, metric: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``search(centroids, current)`` -> the nearest centroid of every row of ``w`` (N, d)
    under ``metric`` (d, d); ``current`` is not needed (ties are settled by the caller)."""
    try:
        import faiss
    except ImportError:
        raise RuntimeError("quantize.kmeans_backend: faiss needs the faiss-cpu package "
                           "(pip install 'bgd-dist[faiss]')") from None
    g = metric.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    lower = (evecs * evals.clamp_min(0).sqrt()).cpu()          # G = lower @ lower.T
    rows = np.ascontiguousarray((w.detach().cpu().to(torch.float64) @ lower).to(torch.float32).numpy())
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    device = w.device

    def search(centroids: Tensor, current: Tensor | None = None) -> Tensor:
        points = np.ascontiguousarray((centroids.detach().cpu().to(torch.float64) @ lower)
                                      .to(torch.float32).numpy())
        _, index = faiss.knn(rows, points, 1)
        return torch.from_numpy(index[:, 0].astype(np.int64)).to(device)

    return search
