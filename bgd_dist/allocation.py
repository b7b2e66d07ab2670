"""``quantize.target_mb``: choose every layer's (d, K) to meet a size budget.

1. The candidates of each layer the rules quantize: the allowed block sizes
   that divide its row length x the allowed K (clamped), plus its rule's own
   (d, K).
2. The full input statistics ``H`` of those layers on the *teacher* (one
   calibration pass per group of layers whose matrices fit in
   ``quantize.hessian.max_mb``; workers shard the images as in a run). ``H``
   gives the paper's pooled metric for any ``d`` (the mean of its diagonal
   blocks), so one pass serves every candidate.
3. One short paper fit per candidate (``allocation.n_iter`` iterations; fit
   tasks run on the executor), scored by its exact relative layer-output
   error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``. A layer whose ``H`` would exceed
   ``max_mb`` (or a grouped convolution) is scored by the paper's relative
   objective instead (the same error without the cross-terms between blocks),
   from a pooled Gram collected at the lcm of its candidate block sizes.
4. ``allocation.method``: ``greedy`` (:func:`bgd_dist.core.budget.allocate`,
   error decrease per byte along each layer's convex hull, then a fill) or
   ``exact`` (:func:`bgd_dist.core.budget.allocate_exact`, the optimum by
   dynamic programming); the budget is ``target_mb`` minus what stays
   uncompressed (fp32).

The result is a new plan (same layers and stages, new d and K) and a table of
every candidate (``allocation.json`` in a run directory).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from tqdm.auto import tqdm

from .core.budget import Option, allocate, allocate_exact, candidate_options, option_bytes
from .core.hessian import pooled_metric, relative_output_error
from .core.kmeans import clamp_n_centroids
from .core.sizing import MB, size_report
from .core.stats import HessianStats, memory_groups
from .nn.modules import get_submodule
from .objectives import objective
from .plan import Plan
from .seeds import Seeds
from .student import student_state
from .messages import CollectRequest, FitJob, FitSettings, LayerRequest

log = logging.getLogger("bgd.allocation")


def _full_statistics(layer, hessian_cfg) -> bool:
    """Whether the layer's full input Hessian can be collected (the hessian objective's condition)."""
    return objective("hessian").unavailable(layer, hessian_cfg) is None


def candidates_of(layer, cfg) -> list[tuple[int, int]]:
    """The (d, K) pairs a layer may take (the allowed sets plus its rule's choice)."""
    a, q = cfg.quantize.allocation, cfg.quantize
    pairs = set(candidate_options(layer.geometry, layer.name, a.block_sizes, a.n_centroids, q.clamp))
    pairs.add((layer.block_size, layer.n_centroids))
    return sorted(pairs)


def allocation_options(cfg, teacher: torch.nn.Module, plan: Plan, executor,
                       progress: bool = True) -> tuple[dict[str, list[Option]], dict[str, list[dict]]]:
    """Every candidate (d, K) of every quantized layer with its bytes and predicted error.

    ``executor`` must be started on ``cfg``'s model and data. Returns the
    options by layer and a table of them (with fit times and how the error was
    predicted) for ``allocation.json``.
    """
    q = cfg.quantize
    layers = plan.quantized
    max_bytes = q.hessian.max_mb * MB
    small = [l for l in layers if _full_statistics(l, q.hessian)]
    large = [l for l in layers if not _full_statistics(l, q.hessian)]
    n_images = q.allocation.n_calibration or q.n_calibration
    executor.load_student(student_state(teacher))
    options: dict[str, list[Option]] = {}
    table: dict[str, list[dict]] = {}
    # one initialisation per candidate: the short fits predict errors; quantize.restarts is for the final fit
    settings = dataclasses.replace(FitSettings.of(q, n_iter=q.allocation.n_iter), restarts=1)
    bar = tqdm(total=len(layers), desc="allocate", unit="layer", disable=not progress)
    passes = [(g, True) for g in memory_groups(small, lambda l: HessianStats.bytes_for(l.geometry), max_bytes)]
    if large:
        passes.append((large, False))
    for group, full in passes:
        candidates = {l.name: candidates_of(l, cfg) for l in group}
        # full: the L x L Hessian; otherwise the pooled Gram at the lcm of the candidate block sizes,
        # from which the pooled Gram of every candidate d follows (the mean of its diagonal blocks)
        request = CollectRequest([LayerRequest(l.name, l.geometry, l.block_size if full else
                                               math.lcm(*{d for d, _ in candidates[l.name]}),
                                               "hessian" if full else "gram") for l in group],
                                 n_images, q.batch_size, Seeds(q.seed).allocation())
        stats = executor.collect(request).stats
        metrics = {}
        for l in group:
            stats[l.name].check()
            metrics[l.name] = stats[l.name].metric()
        jobs, keys = [], {}
        weights = {l.name: get_submodule(teacher, l.name).weight.detach().cpu() for l in group}
        for l in group:
            for d, k in candidates[l.name]:
                job_name = f"{l.name}[d={d},K={k}]"
                keys[job_name] = (l, d, k)
                jobs.append(FitJob(job_name, weights[l.name], l.geometry, pooled_metric(metrics[l.name], d), k, d,
                                   seed=Seeds(q.seed).fit(l), objective="paper", settings=settings))
        fitted = executor.fit(jobs)
        for job_name, (l, d, k) in keys.items():
            cb, seconds = fitted[job_name].codebook, fitted[job_name].seconds
            if full:   # the exact relative output error
                error = relative_output_error(weights[l.name], cb.decode(l.geometry, l.name), l.geometry,
                                              metrics[l.name])
            else:      # the paper's relative objective: the output error without cross-terms between blocks
                error = cb.objective[-1]
            opt = Option(d, k, option_bytes(l.geometry, l.name, d, k), max(0.0, error))
            options.setdefault(l.name, []).append(opt)
            table.setdefault(l.name, []).append({**dataclasses.asdict(opt), "fit_seconds": seconds,
                                                 "predicted_by": "output" if full else "pooled"})
        bar.update(len(group))
    bar.close()
    return options, table


def _budget(teacher: torch.nn.Module, plan: Plan, target_mb: float) -> tuple[float, float]:
    """(bytes left for the quantized layers, bytes that stay fp32); an error when nothing is left."""
    fixed_bytes = size_report(teacher, plan).other_bytes   # skipped layers and every other parameter, fp32
    budget = target_mb * MB - fixed_bytes
    if budget <= 0:
        raise ValueError(f"quantize.target_mb = {target_mb} MB is below the uncompressed part of the model "
                         f"alone ({fixed_bytes / MB:.4f} MB of parameters the rules leave in fp32)")
    return budget, fixed_bytes


def choose(cfg, teacher: torch.nn.Module, plan: Plan, options: dict[str, list[Option]], target_mb: float,
           method: str | None = None):
    """The plan meeting ``target_mb`` from precomputed options; returns (plan, Allocation, fixed bytes)."""
    q = cfg.quantize
    method = method or q.allocation.method
    budget, fixed_bytes = _budget(teacher, plan, target_mb)
    try:
        chosen = (allocate_exact if method == "exact" else allocate)(options, budget)
    except ValueError as e:
        raise ValueError(f"quantize.target_mb = {target_mb} MB: {e} (after {fixed_bytes / MB:.4f} MB that stays "
                         f"fp32)") from None
    entries = []
    for lp in plan.layers:
        if lp.skip:
            entries.append(lp)
            continue
        o = chosen.choices[lp.name]
        k = clamp_n_centroids(o.n_centroids, lp.geometry.n_subvectors(o.block_size, lp.name)) if q.clamp \
            else o.n_centroids
        entries.append(dataclasses.replace(lp, block_size=o.block_size, n_centroids=k, n_centroids_requested=k))
    return Plan(tuple(entries), plan.stages), chosen, fixed_bytes


def allocate_plan(cfg, teacher: torch.nn.Module, plan: Plan, executor, progress: bool = True) -> tuple[Plan, dict]:
    """The plan with every quantized layer's (d, K) chosen for ``cfg.quantize.target_mb``.

    ``executor`` must be started on ``cfg``'s model and data. Returns the new
    plan and a report (``{"target_mb", "budget_mb", "compressed_mb", "layers":
    [{name, chosen, options: [...]}, ...], "seconds"}``).
    """
    q = cfg.quantize
    if q.target_mb is None:
        raise ValueError("allocate_plan needs quantize.target_mb")
    start = time.perf_counter()
    _budget(teacher, plan, q.target_mb)   # fail early, before any statistics, when only the fp32 part fits
    options, table = allocation_options(cfg, teacher, plan, executor, progress)
    new_plan, chosen, fixed_bytes = choose(cfg, teacher, plan, options, q.target_mb)
    achieved = size_report(teacher, new_plan).compressed_mb
    report = {
        "target_mb": q.target_mb, "method": q.allocation.method, "budget_mb": q.target_mb - fixed_bytes / MB,
        "fixed_mb": fixed_bytes / MB, "compressed_mb": achieved, "predicted_error": chosen.total_error,
        "layers": [{"name": n, "chosen": dataclasses.asdict(chosen.choices[n]), "options": table[n]}
                   for n in sorted(table)],
        "seconds": time.perf_counter() - start,
    }
    log.info("allocation (%s) for %.4f MB: %.4f MB (%.2f%% of the target), %d layers, predicted error %.4f, "
             "%.1f s", q.allocation.method, q.target_mb, achieved, 100 * achieved / q.target_mb,
             len(plan.quantized), chosen.total_error, report["seconds"])
    return new_plan, report


def format_allocation(report: dict) -> str:
    lines = [f"{'layer':<44} {'d':>3} {'K':>5} {'MB':>8} {'pred. error':>11}  (candidates)"]
    for entry in report["layers"]:
        c = entry["chosen"]
        lines.append(f"{entry['name']:<44} {c['block_size']:>3} {c['n_centroids']:>5} {c['nbytes'] / MB:>8.4f} "
                     f"{c['error']:>11.4f}  ({len(entry['options'])})")
    lines.append(f"target {report['target_mb']:.4f} MB -> {report['compressed_mb']:.4f} MB "
                 f"({100 * report['compressed_mb'] / report['target_mb']:.2f}% of the target; "
                 f"{report['fixed_mb']:.4f} MB stays fp32), predicted error (sum) {report['predicted_error']:.4f}")
    return "\n".join(lines)
