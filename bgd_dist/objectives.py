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

import torch

from .core.hessian import auto_damp, effective_rank, fit_codebook_hessian, relative_output_error
from .core.kmeans import Codebook, fit_codebook
from .core.layouts import to_subvectors
from .core.sizing import MB
from .core.stats import HessianStats


def _fit_kmeans(job) -> Codebook:
    s = job.settings
    search = None
    if s.kmeans_backend == "faiss":
        from .kmeans_faiss import faiss_search as search
    return fit_codebook(job.weight, job.geometry, job.metric, job.n_centroids, job.block_size, s.n_iter, s.init,
                        job.seed, job.name, s.refine, search)


def layer_damp(damp: float | str, hessian) -> float:
    """The damping of one layer's fit: ``damp`` itself, or for ``auto`` the rule of
    :func:`~bgd_dist.core.hessian.auto_damp` on the effective rank of its ``L x L`` Hessian."""
    if damp != "auto":
        return damp
    return auto_damp(effective_rank(hessian), hessian.shape[0])


def _fit_hessian(job) -> Codebook:
    s = job.settings
    return fit_codebook_hessian(job.weight, job.geometry, job.metric, job.n_centroids, job.block_size, s.n_iter,
                                s.init, job.seed, job.name, s.refine, s.hessian_rounds,
                                layer_damp(s.hessian_damp, job.metric), s.hessian_cg_steps)


def relative_objective(name: str, weight, geometry, codebook: Codebook, stats) -> float | None:
    """The relative objective of ``codebook`` (fitted for ``weight`` under the objective ``name``)
    measured under the statistics ``stats`` (e.g. of held-out calibration images), as the fit
    reports it: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (hessian) or ``Σ Δwᵀ G Δw / Σ wᵀ G w`` over the
    subvectors (paper). None for an objective without calibration statistics (weights)."""
    o = objective(name)
    if not o.needs_calibration:
        return None
    decoded = codebook.decode(geometry, getattr(stats, "layer", "<layer>"))
    if o.stats == "hessian":
        return relative_output_error(weight, decoded, geometry, stats.metric())
    metric = stats.metric().to(torch.float64)
    metric = (metric + metric.T) / 2
    d = codebook.block_size
    w = to_subvectors(weight.detach(), geometry, d).to(torch.float64)
    diff = w - to_subvectors(decoded.detach(), geometry, d).to(torch.float64)
    total = float(((w @ metric) * w).sum())
    err = float(((diff @ metric) * diff).sum())
    return err / total if total > 0 else (0.0 if err == 0 else float("inf"))


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
