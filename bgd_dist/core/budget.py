"""Per-layer (block size, centroids) allocation under a total byte budget.

Each layer has a list of :class:`Option` s, ``(d, K)`` with its size by the
paper's accounting (:func:`bgd_dist.core.sizing.layer_size`) and a predicted
error. :func:`allocate` picks one option per layer so that the summed bytes stay
within the budget and the summed error is small: greedy on error decrease per
byte along each layer's lower convex hull, then a fill phase that spends what is
left on any option that still fits. Sums of bytes are taken with
:func:`math.fsum` (correctly rounded, so independent of order), and the budget
is never exceeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .kmeans import clamp_n_centroids
from .layouts import LayerGeometry, check_block_size
from .sizing import MB, layer_size


@dataclass(frozen=True)
class Option:
    """One way to compress a layer: ``nbytes`` (index + centroid bytes) and a predicted ``error`` (>= 0)."""

    block_size: int
    n_centroids: int
    nbytes: float
    error: float


def candidate_options(geometry: LayerGeometry, name: str, block_sizes: Iterable[int],
                      n_centroids: Iterable[int], clamp: bool = True) -> list[tuple[int, int]]:
    """The ``(d, K)`` pairs allowed for layer ``name``, sorted, without duplicates.

    ``d`` runs over the ``block_sizes`` that divide ``geometry.row_length``
    (others are dropped); ``K`` over ``n_centroids``, passed through
    :func:`clamp_n_centroids` for the layer's number of subvectors when
    ``clamp``. Raises ValueError naming the layer when no block size divides
    its row length.
    """
    block_sizes = list(block_sizes)
    n_centroids = list(n_centroids)
    for k in n_centroids:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"layer {name!r}: n_centroids must be integers >= 1, got {k!r}")
    pairs = set()
    for d in block_sizes:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"layer {name!r}: block sizes must be integers >= 1, got {d!r}")
        if geometry.row_length % d:
            continue
        n_sub = geometry.n_subvectors(d, name)
        for k in n_centroids:
            pairs.add((d, clamp_n_centroids(k, n_sub) if clamp else k))
    if not pairs:
        raise ValueError(
            f"layer {name!r}: none of the block sizes {block_sizes} divides the row length "
            f"{geometry.row_length} of {geometry.kind} weight of shape {tuple(geometry.weight_shape)}"
        )
    return sorted(pairs)


def option_bytes(geometry: LayerGeometry, name: str, block_size: int, n_centroids: int) -> float:
    """Bytes of layer ``name`` quantized with ``(block_size, n_centroids)``: ``layer_size(...).nbytes``."""
    check_block_size(geometry, block_size, name)
    return layer_size(name, geometry, block_size, n_centroids, False).nbytes


@dataclass(frozen=True)
class Allocation:
    """The chosen option of every layer (``choices``, by layer name) and the budget it was chosen for."""

    choices: dict[str, Option]
    budget_bytes: float

    @property
    def total_bytes(self) -> float:
        return math.fsum(o.nbytes for o in self.choices.values())

    @property
    def total_error(self) -> float:
        return math.fsum(o.error for o in self.choices.values())


def _fmt(nbytes: float) -> str:
    return f"{nbytes:.3f} bytes ({nbytes / MB:.4f} MB)"


def _check_options(name: str, opts: list[Option]) -> None:
    if not opts:
        raise ValueError(f"layer {name!r}: no options to choose from")
    for o in opts:
        if not (math.isfinite(o.error) and o.error >= 0):
            raise ValueError(f"layer {name!r}: option {o} has an error that is not finite and >= 0")
        if not (math.isfinite(o.nbytes) and o.nbytes >= 0):
            raise ValueError(f"layer {name!r}: option {o} has a size that is not finite and >= 0")


def _hull(opts: list[Option]) -> list[Option]:
    """Undominated options on the lower convex hull in (bytes, error), by increasing bytes.

    The first point is the cheapest option (ties: lowest error); bytes
    increase and errors decrease strictly along the hull, and the error
    decrease per byte does not increase (collinear points are kept).
    """
    front: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.error)):
        if not front or o.error < front[-1].error:
            front.append(o)
    hull: list[Option] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when the slope a->b is flatter than b->c (b lies above the segment a-c)
            if (a.error - b.error) * (c.nbytes - b.nbytes) < (b.error - c.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate(options: dict[str, list[Option]], budget_bytes: float) -> Allocation:
    """One option per layer with total bytes <= ``budget_bytes`` and a small total error.

    Every layer starts at its cheapest option (ties: lowest error); ValueError
    when these already exceed the budget. Then, greedily, the layer whose next
    point on its lower convex hull (bytes, error) gives the largest error
    decrease per added byte among the upgrades that fit moves there (ties: layer
    name order). When no hull step fits, the fill phase repeatedly moves one
    layer to any of its options with a strictly lower error whose extra bytes
    fit, the largest error decrease first (ties: fewer added bytes, then name).
    """
    if math.isnan(budget_bytes):
        raise ValueError("budget_bytes is NaN")
    names = sorted(options)
    for name in names:
        _check_options(name, options[name])
    hulls = {name: _hull(options[name]) for name in names}
    current = {name: hulls[name][0] for name in names}
    pos = {name: 0 for name in names}
    minimum = math.fsum(o.nbytes for o in current.values())
    if minimum > budget_bytes:
        raise ValueError(f"budget infeasible: the smallest achievable size is {_fmt(minimum)}, "
                         f"over the budget of {_fmt(budget_bytes)}")

    def fits(name: str, new: Option) -> bool:
        """Whether moving ``name`` to ``new`` keeps the exact (fsum) total within the budget."""
        return math.fsum([o.nbytes for n, o in current.items() if n != name] + [new.nbytes]) <= budget_bytes

    def apply_best(candidates: list[tuple[tuple, str, Option]], slack: float) -> str | None:
        """Apply the first candidate (by key) that fits; ``slack`` pre-filters by added bytes."""
        for _, name, new in sorted(candidates, key=lambda c: c[0]):
            if new.nbytes - current[name].nbytes <= slack and fits(name, new):
                current[name] = new
                return name
        return None

    # tolerance of the pre-filter only; fits() decides exactly
    tol = 1e-9 * max(1.0, abs(budget_bytes)) if math.isfinite(budget_bytes) else 0.0
    while True:  # hull phase
        slack = budget_bytes - math.fsum(o.nbytes for o in current.values()) + tol
        candidates = []
        for name in names:
            if pos[name] + 1 < len(hulls[name]):
                cur, nxt = current[name], hulls[name][pos[name] + 1]
                ratio = (cur.error - nxt.error) / (nxt.nbytes - cur.nbytes)
                candidates.append(((-ratio, name), name, nxt))
        moved = apply_best(candidates, slack)
        if moved is None:
            break
        pos[moved] += 1
    while True:  # fill phase
        slack = budget_bytes - math.fsum(o.nbytes for o in current.values()) + tol
        candidates = []
        for name in names:
            cur = current[name]
            for o in options[name]:
                if o.error < cur.error and o.nbytes - cur.nbytes <= slack:
                    candidates.append(((o.error - cur.error, o.nbytes - cur.nbytes, name), name, o))
        if apply_best(candidates, slack) is None:
            break
    return Allocation({name: current[name] for name in names}, budget_bytes)


def allocate_exact(options: dict[str, list[Option]], budget_bytes: float, resolution: int = 20000) -> Allocation:
    """The minimum total error under the budget, by dynamic programming (multiple-choice knapsack).

    Bytes are counted in units of ``budget_bytes / resolution``, every option's
    size rounded *up*, so the budget is never exceeded; the result is optimal
    for sizes rounded that way, hence within ``len(options)`` units of the true
    optimum's budget. Costs ``O(layers · options · resolution)`` (vectorised).
    ValueError as :func:`allocate` when the budget is infeasible.
    """
    import torch

    if math.isnan(budget_bytes) or budget_bytes <= 0 or math.isinf(budget_bytes):
        if math.isinf(budget_bytes) and budget_bytes > 0:
            return allocate(options, budget_bytes)
        raise ValueError(f"budget_bytes must be a positive finite number, got {budget_bytes}")
    names = sorted(options)
    for name in names:
        _check_options(name, options[name])
    minimum = math.fsum(min(o.nbytes for o in options[n]) for n in names)
    if minimum > budget_bytes:
        raise ValueError(f"budget infeasible: the smallest achievable size is {_fmt(minimum)}, "
                         f"over the budget of {_fmt(budget_bytes)}")
    if not names:
        return Allocation({}, budget_bytes)
    unit = budget_bytes / resolution
    inf = math.inf
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = []
    for name in names:
        new = torch.full_like(best, inf)
        pick = torch.full((resolution + 1,), -1, dtype=torch.long)
        for i, o in enumerate(options[name]):
            cost = math.ceil(o.nbytes / unit - 1e-9)
            if cost > resolution:
                continue
            cand = torch.full_like(best, inf)
            cand[cost:] = best[:resolution + 1 - cost] + o.error
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, i), pick)
        best = new
        choice.append(pick)
    if not torch.isfinite(best).any():
        # rounding up made every combination exceed the budget: fall back to the greedy
        return allocate(options, budget_bytes)
    c = int(torch.argmin(best))
    picked = {}
    for name, pick in zip(reversed(names), reversed(choice)):
        o = options[name][int(pick[c])]
        picked[name] = o
        c -= math.ceil(o.nbytes / unit - 1e-9)
    return Allocation({n: picked[n] for n in names}, budget_bytes)
