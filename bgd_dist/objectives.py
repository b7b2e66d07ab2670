"""The objectives a layer can be fitted under: one table, used by the plan, the config,
the CLI, the driver, the workers and the size allocation.

=========  ===============  ======================================================
objective  statistics       fit
=========  ===============  ======================================================
weights    ``identity``     k-means of the weights (classic PQ; no calibration)
paper      ``gram``         k-means under the pooled input Gram (the paper's)
hessian    ``hessian``      the paper's fit, then error feedback under the full
                            input Hessian (falls back to ``paper`` for a grouped
                            convolution or a Hessian above ``hessian.max_mb``)
=========  ===============  ======================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .core.hessian import fit_codebook_hessian
from .core.kmeans import Codebook, fit_codebook
from .core.sizing import MB
from .core.stats import HessianStats


def _fit_kmeans(job) -> Codebook:
    s = job.settings
    search = None
    if s.kmeans_backend == "faiss":
        from .kmeans_faiss import faiss_search as search
    return fit_codebook(job.weight, job.geometry, job.metric, job.n_centroids, job.block_size, s.n_iter, s.init,
                        job.seed, job.name, s.refine, search)


def _fit_hessian(job) -> Codebook:
    s = job.settings
    return fit_codebook_hessian(job.weight, job.geometry, job.metric, job.n_centroids, job.block_size, s.n_iter,
                                s.init, job.seed, job.name, s.refine, s.hessian_rounds, s.hessian_damp,
                                s.hessian_cg_steps)


def _hessian_fallback(layer, hessian_cfg) -> str | None:
    if layer.geometry.groups != 1:
        return f"it is a grouped convolution (groups = {layer.geometry.groups}; each group sees its own inputs)"
    mb = HessianStats.bytes_for(layer.geometry) / MB
    if mb > hessian_cfg.max_mb:
        return (f"its {layer.geometry.row_length}x{layer.geometry.row_length} input Hessian ({mb:.1f} MB) exceeds "
                f"quantize.hessian.max_mb = {hessian_cfg.max_mb:g}")
    return None


@dataclass(frozen=True)
class Objective:
    """One objective: the statistics it collects, the fit they drive, and when it cannot apply."""

    name: str                                   # as the plan, the config and the CLI spell it
    stats: str                                  # the statistics type (bgd_dist.core.stats.make_stats)
    fit: Callable[..., Codebook]                # FitJob -> Codebook
    fallback: str | None = None                 # the objective used when ``unavailable`` gives a reason
    unavailable: Callable[..., str | None] = lambda layer, hessian_cfg: None   # why not, for a layer (None: ok)

    @property
    def needs_calibration(self) -> bool:
        return self.stats != "identity"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("paper", "gram", _fit_kmeans),
    Objective("weights", "identity", _fit_kmeans),
    Objective("hessian", "hessian", _fit_hessian, fallback="paper", unavailable=_hessian_fallback),
)}
NAMES: tuple[str, ...] = tuple(OBJECTIVES)


def objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; expected one of {NAMES}") from None


def fallback_reason(layer, hessian_cfg) -> str | None:
    """Why ``layer`` (a plan entry) cannot use its planned objective (None: it can)."""
    return objective(layer.objective).unavailable(layer, hessian_cfg)


def resolve(layer, hessian_cfg) -> tuple[Objective, str | None]:
    """The objective ``layer`` is fitted under, and the reason it differs from the planned one
    (None when it does not)."""
    planned = objective(layer.objective)
    why = planned.unavailable(layer, hessian_cfg)
    return (planned, None) if why is None else (objective(planned.fallback), why)
