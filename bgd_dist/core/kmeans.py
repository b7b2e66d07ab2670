"""k-means under a d x d metric: one codebook per layer (METHOD.md §2).

Pure functions over tensors; device and dtype follow the weight.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .layouts import LayerGeometry, from_subvectors, to_subvectors

INITS = ("random", "kmeans++")
REFINES = ("hartigan", "lloyd")
# refine="hartigan": an iteration runs the Lloyd E-step while the previous iteration's
# Lloyd moves (done or pending) touched more than this share of the clusters
_LLOYD_SHARE = 0.5
# the objective after every iteration is computed from the residuals below this many weights, from the
# cluster sums above (the returned codebook's always from the residuals)
_EXACT_BELOW = 1 << 16


@dataclass(frozen=True)
class Codebook:
    """The result of fitting one layer.

    centroids: (n_centroids, block_size); assignments: (n_subvectors,) int64 in
    the reference's unrolled order; objective: the relative objective
    ``Σ_i (w_i - c_a(i))ᵀ G (w_i - c_a(i)) / Σ_i w_iᵀ G w_i`` after each
    iteration's assignment step (E-step, then Hartigan round when enabled; see
    :func:`fit_codebook`): ``n_iter + 1`` values, non-increasing, the last one
    for the returned codebook.
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


_LANES = 32  # see _tie_order
# rows of the (rows, K) score matrix scored at once on CPU: large enough that the per-call overhead of a
# few torch operations per chunk stays small, small enough that the matrix stays in the cache
_CPU_CHUNK = 4096
_PENDING = 1024  # rows whose scores _nearest keeps for one batched argmin (see there)


@functools.lru_cache(maxsize=16)
def _tie_order(k: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(rank, column)``: the order in which :func:`_argmin_rows` breaks exact ties among K columns.

    ``rank`` (K,) in ``dtype``: the rank of every column; ``column`` (K,) int64: the column of every
    rank. With ``K = G * 32`` (``K >= 64``) columns are ranked lane first, then group
    (``j = group * 32 + lane``: lane ``j % 32``, group ``j // 32``), the order of the lane-wise
    reduction this function once used (kept so that the codebooks stay identical); otherwise by index.
    """
    j = torch.arange(k, device=device)
    rank = j if k % _LANES or k < 2 * _LANES else (j % _LANES) * (k // _LANES) + j // _LANES
    return rank.to(dtype), torch.argsort(rank)


def _argmin_rows(scores: Tensor, overwrite: bool = False) -> Tensor:
    """Index of a minimum of every row of ``scores`` (n, K); deterministic ties (:func:`_tie_order`).

    ``argmin`` over rows is slow on CPU (not vectorised), elementwise operations and ``amin``
    are not: with ``m`` the row minimum, ``sign(s - m)`` is 0 exactly at the minima (``s - m == 0``
    iff ``s == m`` for finite floats; ``+inf`` entries give 1) and the smallest
    ``K·sign(s - m) + rank`` of a row is the rank of its first minimum. ``overwrite``: ``scores``
    may be used as scratch space (its content is then undefined).
    """
    n, k = scores.shape
    if scores.device.type != "cpu":
        return scores.argmin(1)
    if scores.dtype not in (torch.float32, torch.float64):
        if k % _LANES or k < 2 * _LANES:
            return scores.argmin(1)
        groups = k // _LANES
        by_lane = scores.view(n, groups, _LANES)
        lane = by_lane.amin(1).argmin(1)                                    # (n,)
        group = by_lane.gather(2, lane.view(n, 1, 1).expand(n, groups, 1)).squeeze(2).argmin(1)
        return group * _LANES + lane
    rank, column = _tie_order(k, scores.device, scores.dtype)
    key = scores if overwrite else scores.clone()
    key.sub_(key.amin(1, keepdim=True)).sign_()
    torch.add(rank, key, alpha=k, out=key)                                  # rank + K·sign(s - m)
    # (NaN scores, which finite inputs do not produce, would give an arbitrary valid index)
    return column[key.amin(1).long().clamp_(0, k - 1)]


def _nearest(w: Tensor, centroids: Tensor, metric: Tensor, current: Tensor | None = None,
             chunk: int | None = None, w_aug: Tensor | None = None, changed: list[Tensor] | None = None) -> Tensor:
    """argmin_c (w - c)ᵀ G (w - c) for each row of w (N, d), via cᵀGc - 2 wᵀGc.

    The scores are one GEMM of the rows ``[w, 1]`` (``w_aug``, (N, d+1), built here
    when not given) with the columns ``[-2 Gc ; cᵀGc]``.

    Chunked so the (chunk, K) score matrix stays in cache (CPU; default ``_CPU_CHUNK``
    rows, 65536 on accelerators). With ``current``
    (N,) given, a row keeps its current centroid whenever that one attains the
    row minimum (ties favour the current assignment) and the full argmin is
    only computed for the rows where it does not, which after the first few
    k-means iterations are few: their scores are gathered over the chunks and
    their argmins taken together (:func:`_argmin_rows`). Those rows are the ones whose
    assignment changes: with ``changed`` (a list) given, they are appended to it (pieces in
    ascending order).
    """
    if chunk is None:
        chunk = _CPU_CHUNK if w.device.type == "cpu" else 65536
    if w_aug is None:
        w_aug = _augment(w)
    cg = centroids @ metric                       # (K, d)
    cols = torch.cat([-2 * cg, (centroids * cg).sum(1, keepdim=True)], 1).T.contiguous()   # (d+1, K)
    n, k = w.shape[0], centroids.shape[0]
    out = torch.empty(n, dtype=torch.long, device=w.device) if current is None else current.clone()
    buf = torch.empty(min(chunk, n), k, dtype=w.dtype, device=w.device)
    if current is not None:
        # the scores of the rows whose argmin is still to take, a few at a time (CPU: what the cache holds)
        cap = min(_PENDING, buf.shape[0]) if w.device.type == "cpu" else buf.shape[0]
        pending = torch.empty(cap, k, dtype=w.dtype, device=w.device)
        pending_rows: list[Tensor] = []
        now = out.unsqueeze(1)                    # (N, 1)
    filled = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = buf if stop - start == buf.shape[0] else buf[:stop - start]
        torch.mm(w_aug[start:stop], cols, out=scores)                 # (m, K)
        if current is None:
            out[start:stop] = _argmin_rows(scores, overwrite=True)
            continue
        # rows whose current centroid does not attain the minimum
        worse = torch.nonzero(scores.gather(1, now[start:stop]).view(-1) > scores.amin(1)).view(-1)
        for part in (worse,) if worse.shape[0] <= pending.shape[0] else worse.split(pending.shape[0]):
            nw = part.shape[0]
            if filled + nw > pending.shape[0]:
                out[torch.cat(pending_rows)] = _argmin_rows(pending[:filled], overwrite=True)
                filled, pending_rows = 0, []
            if nw:
                torch.index_select(scores, 0, part, out=pending[filled:filled + nw])
                pending_rows.append(part.add_(start))
                if changed is not None:
                    changed.append(part)
                filled += nw
    if filled:
        out[torch.cat(pending_rows)] = _argmin_rows(pending[:filled], overwrite=True)
    return out


def torch_search(w: Tensor, metric: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The default nearest-centroid search over the rows of ``w`` under ``metric``:
    ``search(centroids, current)`` -> assignments (:func:`_nearest`)."""
    w_aug = _augment(w)
    return lambda centroids, current: _nearest(w, centroids, metric, current, w_aug=w_aug)


def _augment(w: Tensor) -> Tensor:
    """``[w, 1]`` (N, d+1)."""
    return torch.cat([w, torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)], 1)


def _sq_error(c64: Tensor, sums: Tensor, counts: Tensor, total: float, metric64: Tensor) -> float:
    """``Σ_i (w_i - c_a(i))ᵀ G (w_i - c_a(i))`` from the cluster sums ``Σ_{a(i)=k} w_i`` (K, d) and
    counts (K,): ``Σ_i w_iᵀGw_i - 2 Σ_k sums_kᵀ G c_k + Σ_k n_k c_kᵀ G c_k`` (float64)."""
    cg = c64 @ metric64
    return max(0.0, total - 2 * float((sums * cg).sum()) + float((counts.to(torch.float64) * (c64 * cg).sum(1)).sum()))


def _move_sums(sums: Tensor, w64: Tensor, rows: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Cluster sums after ``rows`` moved from ``src`` to ``dst`` (a new tensor).

    ``scatter_add`` adds the rows in the same order as ``index_add`` (row by row, so the float64
    sums are the same), several times faster on CPU."""
    wr = w64.index_select(0, rows)
    d = wr.shape[1]
    return sums.scatter_add(0, src.unsqueeze(1).expand(-1, d), wr.neg()).scatter_add_(
        0, dst.unsqueeze(1).expand(-1, d), wr)


def _move_counts(counts: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Cluster sizes after one member of ``src[j]`` moved to ``dst[j]`` for every j (a new tensor;
    equal to the ``bincount`` of the new assignments)."""
    one = torch.ones_like(src)
    return counts.index_add(0, src, one, alpha=-1).index_add_(0, dst, one)


def _distinct_rows(w: Tensor, k: int) -> Tensor | None:
    """The distinct rows of ``w`` (N, d) (``torch.unique(w, dim=0)``), or None when there are more than ``k``.

    A 64-bit hash of every row's bits is counted first (cheap); colliding rows only
    lower that count, so more than ``k`` distinct hashes proves more than ``k``
    distinct rows and the exact (sorting) pass is skipped.
    """
    if w.shape[0] > k and w.dtype in (torch.float32, torch.float64):
        mult = torch.tensor([0x9E3779B97F4A7C15 - (1 << 64)], dtype=torch.int64, device=w.device)
        # a prefix of the rows first: more than k distinct hashes there prove it for the whole
        # (the usual case, at a fraction of the cost); otherwise every row
        for rows in ((w[:8 * k], w) if w.shape[0] > 8 * k else (w,)):
            bits = (rows + 0.0).view(torch.int32 if w.dtype == torch.float32 else torch.int64).to(torch.int64)
            h = torch.zeros(rows.shape[0], dtype=torch.int64, device=w.device)   # (+ 0.0: -0.0 -> 0.0)
            for j in range(rows.shape[1]):
                h = (h ^ bits[:, j]) * mult
                h = h ^ (h >> 29)
            if torch.unique(h).shape[0] > k:
                return None
    return torch.unique(w, dim=0)


def _quad(diff: Tensor, metric: Tensor) -> Tensor:
    """Row-wise ``diffᵀ G diff`` (clamped at 0)."""
    return ((diff @ metric) * diff).sum(1).clamp_min(0)


def _assign(w: Tensor, centroids: Tensor, metric: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """argmin_c (w - c)ᵀ G (w - c) for each row of w; returns (assignments, distance)."""
    assignments = _nearest(w, centroids, metric, chunk=chunk)
    return assignments, _quad(w - centroids[assignments], metric)


def _greedy_matching(src: Tensor, dst: Tensor) -> Tensor:
    """Greedy matching of the moves ``src[j] -> dst[j]`` (sorted by decreasing gain).

    Returns the positions of the moves kept: best gain first, a move is skipped when
    one of its two clusters already takes part in a kept move.
    """
    taken: set[int] = set()
    kept = []
    for j, (s, t) in enumerate(zip(src.tolist(), dst.tolist())):
        if s not in taken and t not in taken:
            taken.update((s, t))
            kept.append(j)
    return torch.tensor(kept, dtype=torch.long, device=src.device)


def _hartigan_moves(x_aug: Tensor, w64: Tensor, centroids: Tensor, means: Tensor, metric: Tensor,
                    metric64: Tensor, assignments: Tensor, counts: Tensor, frozen: Tensor,
                    chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """One batched Hartigan round: moves that lower the objective once the means are updated.

    Moving subvector ``i`` from cluster ``a`` (``n_a >= 2`` members, mean ``μ_a``) to
    ``b`` (``n_b`` members, mean ``μ_b``) and re-centring both changes the objective by
    ``n_b/(n_b+1)·d(i, μ_b) − n_a/(n_a−1)·d(i, μ_a)`` exactly (``d`` = squared G-distance).
    This can be negative while ``d(i, μ_b) > d(i, μ_a)``: a Lloyd fixed point need not
    be a Hartigan fixed point, and they differ most when clusters are small (few
    subvectors per centroid).

    x_aug: (N, d+1) rows ``[w_i, w_iᵀGw_i]`` in working precision; w64: (N, d) the
    subvectors in float64; centroids: (K, d) working precision, ≈ ``means``, used to
    propose moves; means: (K, d) float64, the exact mean of the members of every
    cluster that is not frozen; assignments: (N,); counts: (K,); frozen: (K,) bool,
    the clusters that must not take part (those changed by this iteration's Lloyd
    moves). Every row of a non-frozen cluster with >= 2 members proposes its best
    destination among the non-frozen clusters (working-precision distances, one
    (chunk, K) matmul per chunk as in the E-step); the gain of each proposal is
    recomputed in float64 with the exact means, and the proposals with a positive
    gain are greedily matched by decreasing gain so that every cluster takes part in
    at most one move: the kept gains are then exact and add up.
    Returns (rows moved (M,), their destinations (M,), gains (M,) float64, share):
    share is the fraction of the K clusters that the proposals with a positive gain
    that are also Lloyd moves (``d(i, μ_b) < d(i, μ_a)``) touch, kept or not.
    """
    if chunk is None:
        chunk = _CPU_CHUNK if x_aug.device.type == "cpu" else 65536
    device, dtype = x_aug.device, x_aug.dtype
    k = counts.shape[0]
    none = (torch.zeros(0, dtype=torch.long, device=device),) * 2 + (
        torch.zeros(0, dtype=torch.float64, device=device), 0.0)
    allowed = ~frozen
    eligible = allowed & (counts >= 2)                               # the clusters whose rows may move
    if int(allowed.sum()) < 2 or not bool(eligible.any()):
        return none
    rows = torch.nonzero(eligible[assignments]).flatten()
    cnt = counts.to(dtype)
    grow = cnt / (cnt + 1)                                           # n_b / (n_b + 1)
    own_factor = (cnt + 1) / (cnt - 1).clamp_min(1)                  # (n_a/(n_a-1)) / (n_a/(n_a+1))
    # cost(i, b) = n_b/(n_b+1)·(w_iᵀGw_i - 2 w_iᵀGc_b + c_bᵀGc_b): one matmul of the rows
    # [w_i, w_iᵀGw_i] with the columns [-2 n_b/(n_b+1)·Gc_b ; n_b/(n_b+1)], plus a bias
    # (+inf for the frozen clusters)
    cg = centroids @ metric                                          # (K, d)
    bias = torch.where(allowed, grow * (centroids * cg).sum(1), math.inf)
    cols = torch.cat([-2 * cg * grow[:, None], grow[:, None]], 1).T.contiguous()   # (d+1, K)
    cand_rows, cand_dst = [], []
    buf = torch.empty(min(chunk, rows.shape[0]), k, dtype=dtype, device=device)
    span = torch.arange(buf.shape[0], device=device)
    for start in range(0, rows.shape[0], chunk):
        r = rows[start:start + chunk]
        own = assignments[r]
        at = span[:r.shape[0]]
        cost = torch.addmm(bias, x_aug[r], cols, out=buf[:r.shape[0]])   # (m, K)
        own_cost = cost[at, own] * own_factor[own]                   # n_a/(n_a-1)·d(i, c_a)
        cost[at, own] = math.inf
        better = torch.nonzero(cost.amin(1) < own_cost).flatten()   # few rows: argmin on those only
        if better.numel():
            cand_rows.append(r[better])
            cand_dst.append(_argmin_rows(cost.index_select(0, better), overwrite=True))
    if not cand_rows:
        return none
    i, b = torch.cat(cand_rows), torch.cat(cand_dst)
    # exact gains, float64, exact means
    a = assignments[i]
    n64 = counts.to(torch.float64)
    d_own = _quad(w64[i] - means[a], metric64)
    d_dst = _quad(w64[i] - means[b], metric64)
    gain = d_own * n64[a] / (n64[a] - 1) - d_dst * n64[b] / (n64[b] + 1)
    pos = torch.nonzero(gain > 0).flatten()
    closer = pos[d_dst[pos] < d_own[pos]]
    lloyd = torch.zeros(k, dtype=torch.bool, device=device)
    lloyd[a[closer]] = True
    lloyd[b[closer]] = True
    order = pos[torch.argsort(gain[pos], descending=True, stable=True)]
    kept = order[_greedy_matching(a[order], b[order])]
    return i[kept], b[kept], gain[kept], float(lloyd.double().mean())


def _kmeanspp(w: Tensor, k: int, metric: Tensor, gen: torch.Generator) -> Tensor:
    """k-means++ seeding under the metric (distances in float64); returns (k, d) rows of w."""
    n = w.shape[0]
    w64, g64 = w.double(), metric.double()
    wg = w64 @ g64
    w_norm = (wg * w64).sum(1)

    def dist_to(i: int) -> Tensor:  # ||w - w_i||²_G for all rows, by expansion
        return (w_norm - 2 * (wg @ w64[i]) + w_norm[i]).clamp_min(0)

    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    best = dist_to(first)
    for _ in range(1, k):
        cumulative = best.cumsum(0)
        total = float(cumulative[-1])
        if total <= 0:
            # every point coincides (under the metric) with a chosen centroid: any index will do
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
            target = torch.tensor([u], dtype=torch.float64, device=w.device)
            idx = min(int(torch.searchsorted(cumulative, target, right=True)), n - 1)
        chosen.append(idx)
        best = torch.minimum(best, dist_to(idx))
    return w[torch.tensor(chosen, device=w.device)].clone()


def _splittable(w: Tensor, assignments: Tensor, k: int) -> Tensor:
    """(k,) bool: clusters with at least two members that are not all identical."""
    d = w.shape[1]
    index = assignments.unsqueeze(1).expand(-1, d)
    lo = torch.full((k, d), math.inf, dtype=w.dtype, device=w.device).scatter_reduce_(0, index, w, "amin")
    hi = torch.full((k, d), -math.inf, dtype=w.dtype, device=w.device).scatter_reduce_(0, index, w, "amax")
    return (hi > lo).any(1)


def _repair_empty(w: Tensor, assignments: Tensor, counts: Tensor, centroids: Tensor) -> tuple[Tensor, int]:
    """Split the most populated cluster for every empty one. Bounded: one pass.

    The points of the largest cluster are ordered along their direction of
    largest spread and the upper half is moved to the empty cluster, whose
    centroid first takes the largest cluster's value (``centroids`` is
    modified in place); the objective is unchanged by the move and can only
    decrease at the following M-step. Clusters whose members are all
    identical are never split (that would only duplicate a centroid): when no
    cluster can be split the codebook keeps fewer distinct centroids.
    Returns (new assignments, number of clusters repaired).
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return assignments, 0
    k = counts.shape[0]
    splittable = _splittable(w, assignments, k)
    if not bool(splittable.any()):
        return assignments, 0
    assignments = assignments.clone()
    counts = counts.clone()
    repaired = 0
    for e in empty:
        candidates = torch.where(splittable, counts, torch.zeros_like(counts))
        big = int(torch.argmax(candidates))
        if int(candidates[big]) < 2:
            break  # nothing left to split: fewer distinct centroids than requested
        members = torch.nonzero(assignments == big).flatten()
        pts = w[members]
        spread = pts - pts.mean(0)
        axis = int(torch.argmax(spread.pow(2).sum(0)))
        order = torch.argsort(spread[:, axis], stable=True)
        half = order.shape[0] // 2
        moved = members[order[half:]]
        assignments[moved] = e
        centroids[e] = centroids[big]
        counts[e] = moved.shape[0]
        counts[big] -= moved.shape[0]
        for c, part in ((big, pts[order[:half]]), (e, pts[order[half:]])):
            splittable[c] = part.shape[0] >= 2 and bool((part.amax(0) > part.amin(0)).any())
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
    refine: str = "hartigan",
    search: Callable[[Tensor, Tensor], Callable[[Tensor, Tensor | None], Tensor]] | None = None,
) -> Codebook:
    """k-means of the layer's subvectors under ``metric`` (d x d, PSD; None = identity).

    ``search(w, metric)`` builds the nearest-centroid search of the E-step (default
    :func:`torch_search`; another backend may return a different centroid only where two are
    within its rounding of each other: an assignment still changes only when the new centroid
    is strictly closer in float64, below).

    weight: the layer's weight, shape ``geometry.weight_shape``; the fit runs in
    the weight's dtype and on its device. ``n_centroids`` is used as given (apply
    :func:`clamp_n_centroids` before, as the plan does). Terminates after exactly
    ``n_iter`` iterations; empty clusters are repaired by a bounded split.

    One iteration = one M-step (the centroid of every cluster whose members
    changed becomes their mean, after the bounded repair of empty clusters), then
    one assignment step, which scores every subvector against every centroid
    once or twice. Iteration 0 is an assignment step against the initial
    centroids alone, so ``n_iter`` iterations compare with ``n_iter`` iterations
    of the reference's EM plus its initial assignment.

    - ``refine="lloyd"``: the assignment step is the Lloyd E-step (nearest centroid).
    - ``refine="hartigan"`` (default): while Lloyd moves touch more than half of
      the clusters (``_LLOYD_SHARE``), the E-step followed by one batched
      Hartigan round (:func:`_hartigan_moves`, a second pass as large as the
      E-step) on the clusters the E-step left unchanged; afterwards the Hartigan
      round alone (one pass), which also reports the Lloyd moves still pending,
      and the E-step comes back if those touch more than half of the clusters.

    Why Hartigan rounds: with few subvectors per centroid (e.g. 16 for a 64x64
    3x3 conv with K = 256), Lloyd stalls at a fixed point that is not a local
    minimum of the objective once centroids follow their members: moving ``i``
    from ``a`` to ``b`` and re-centring both lowers the objective whenever
    ``n_b/(n_b+1)·d(i,b) < n_a/(n_a−1)·d(i,a)``, even if ``b`` is farther than
    ``a``. A round keeps the best such moves so that every cluster takes part
    in at most one (greedy matching by gain), which makes every gain exact, and
    only among clusters the E-step's moves did not touch (their part of the
    objective is bounded with their old centroids): the objective decreases by
    the sum of the gains. The moved clusters get their new means at once.

    The objective is evaluated in float64: from the residuals ``(w-c)ᵀG(w-c)`` for
    small layers and for the returned codebook, otherwise from the cluster sums
    ``Σ wᵀGw - 2 Σ_k s_kᵀGc_k + Σ_k n_k c_kᵀGc_k`` (``s_k`` the float64 sum of the
    members, kept up to date by every move; the M-step mean is ``s_k / n_k``); an
    E-step assignment only changes when the new centroid is strictly closer
    under that exact distance, Hartigan gains are computed in float64 with the
    exact means (and a round whose result, after rounding the new means to the
    working precision, would not be lower is dropped), and centroids are
    float64 means, so the objective does not increase beyond float64 rounding.
    ``Codebook.objective`` holds the objective after iteration 0 and after each
    iteration's assignment step: ``n_iter + 1`` values, the last one that of the
    returned codebook. When K >= the number of distinct
    subvectors, every distinct subvector becomes a centroid (the optimum).
    """
    try:
        n_centroids = operator.index(n_centroids)
    except TypeError:
        raise ValueError(f"layer {name!r}: n_centroids must be an integer, got {n_centroids!r}") from None
    if n_centroids < 1:
        raise ValueError(f"layer {name!r}: n_centroids must be >= 1, got {n_centroids}")
    if n_iter < 0:
        raise ValueError(f"layer {name!r}: n_iter must be >= 0, got {n_iter}")
    if refine not in REFINES:
        raise ValueError(f"layer {name!r}: unknown refine {refine!r}; expected one of {REFINES}")
    if init not in INITS:
        raise ValueError(f"layer {name!r}: unknown init {init!r}; expected one of {INITS}")
    if tuple(weight.shape) != tuple(geometry.weight_shape):
        raise ValueError(f"layer {name!r}: weight shape {tuple(weight.shape)} != geometry {geometry.weight_shape}")
    if not weight.is_floating_point():
        raise ValueError(f"layer {name!r}: weight must be floating point, got {weight.dtype}")
    _check_finite(weight, "the weight", name)
    w = to_subvectors(weight.detach(), geometry, block_size, name).contiguous()
    if metric is None:
        metric = torch.eye(block_size, dtype=w.dtype, device=w.device)
    if tuple(metric.shape) != (block_size, block_size):
        raise ValueError(f"layer {name!r}: metric shape {tuple(metric.shape)} != ({block_size}, {block_size})")
    _check_finite(metric, "the statistics", name)
    metric64 = metric.to(device=w.device, dtype=torch.float64)
    metric64 = (metric64 + metric64.T) / 2        # exact metric: objective and tie-breaking
    metric = metric64.to(w.dtype)                 # working precision: nearest-centroid search
    w64 = w.double()
    w64_t = w64.T.contiguous()                    # (d, N)
    n = w.shape[0]
    k = n_centroids
    distinct = _distinct_rows(w, k)
    n_distinct = n if distinct is None else distinct.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if k >= n_distinct:
        if k > n_distinct:
            warnings.warn(
                f"layer {name!r}: {k} centroids requested but only {n_distinct} distinct subvectors; "
                f"the codebook will contain duplicate centroids",
                stacklevel=2,
            )
        # the optimum: one centroid per distinct subvector (padded with repeats)
        pad = torch.arange(k - n_distinct, device=w.device) % n_distinct
        centroids = torch.cat([distinct, distinct[pad]]).clone()
    elif init == "random":
        idx = torch.randperm(n, generator=gen)[:k]
        centroids = w[idx.to(w.device)].clone()
    else:
        centroids = _kmeanspp(w, k, metric, gen)
    total = float((metric64 * (w64.T @ w64)).sum())
    scale = total if total > 0 else 1.0

    moves: list[Tensor] | None = None            # the default search reports the rows it moves
    if search is None:
        moves = []
        w_aug = _augment(w)

        def nearest(c: Tensor, current: Tensor | None) -> Tensor:
            return _nearest(w, c, metric, current, w_aug=w_aug, changed=moves)
    else:
        nearest = search(w, metric)
    if refine == "hartigan":
        x_aug = torch.cat([w, ((w64 @ metric64) * w64).sum(1, keepdim=True).to(w.dtype)], 1)   # (N, d+1)
    objective: list[float] = []
    repaired = 0
    none = torch.zeros(0, dtype=torch.long, device=w.device)
    assignments: Tensor | None = None
    means64 = centroids.double()                  # (K, d) float64 mean of every clean cluster
    stale = torch.ones(k, dtype=torch.bool, device=w.device)   # centroid to recompute at the M-step
    lloyd_share = 1.0                             # see _LLOYD_SHARE
    for it in range(n_iter + 1):
        c64 = centroids.double()
        previous = assignments
        e_step = previous is None or refine == "lloyd" or lloyd_share > _LLOYD_SHARE
        if moves:
            moves.clear()
        proposed = nearest(centroids, assignments) if e_step else previous
        lloyd = none                              # the rows that move (ascending)
        if previous is not None and e_step:
            # a point moves only if the new centroid is strictly closer under the exact distance
            if moves is None:
                changed = torch.nonzero(proposed != previous).flatten()
            else:
                changed = torch.cat(moves) if moves else none
            if changed.numel():
                wc = w64[changed]
                d_new = _quad(wc - c64[proposed[changed]], metric64)
                d_old = _quad(wc - c64[previous[changed]], metric64)
                stay = d_old <= d_new
                kept = changed[stay]
                proposed[kept] = previous[kept]
                lloyd = changed[~stay]
        assignments = proposed
        if previous is None:
            sums = torch.zeros(w.shape[1], k, dtype=torch.float64, device=w.device).index_add_(
                1, assignments, w64_t).T.contiguous()                   # (K, d) Σ of every cluster's rows
            counts = torch.bincount(assignments, minlength=k)
        else:
            src, dst = previous[lloyd], assignments[lloyd]
            stale[src] = True
            stale[dst] = True
            lloyd_share = float(stale.double().mean())
            if lloyd.numel():
                sums = _move_sums(sums, w64, lloyd, src, dst)
                counts = _move_counts(counts, src, dst)
        value = _sq_error(c64, sums, counts, total, metric64)
        if refine == "hartigan" and previous is not None:
            # clusters changed by the Lloyd moves above keep their (old) centroids, which
            # bounds their part of the objective; the others take batched Hartigan moves
            rows, dst, _, pending = _hartigan_moves(x_aug, w64, centroids, means64, metric, metric64,
                                                    assignments, counts, stale)
            if not e_step:
                lloyd_share = pending
            if rows.numel():
                src = assignments[rows]
                moved = assignments.clone()
                moved[rows] = dst
                # every cluster takes part in one move at most: update both means in place
                n64 = counts.to(torch.float64)
                m_src = means64[src] + (means64[src] - w64[rows]) / (n64[src] - 1).unsqueeze(1)
                m_dst = means64[dst] + (w64[rows] - means64[dst]) / (n64[dst] + 1).unsqueeze(1)
                recentred = centroids.clone()
                recentred[src] = m_src.to(w.dtype)
                recentred[dst] = m_dst.to(w.dtype)
                r64 = recentred.double()
                r_sums = _move_sums(sums, w64, rows, src, dst)
                r_counts = _move_counts(counts, src, dst)
                r_value = _sq_error(r64, r_sums, r_counts, total, metric64)
                # the gains are exact in float64; this only guards against the rounding of
                # the new means to the working precision
                if r_value <= value:
                    assignments, centroids, c64, value = moved, recentred, r64, r_value
                    sums, counts = r_sums, r_counts
                    means64[src] = m_src
                    means64[dst] = m_dst
        if it == n_iter or n * w.shape[1] <= _EXACT_BELOW:
            # exact from the residuals (small layers, and the returned codebook)
            diff = w64_t - c64.T.contiguous().index_select(1, assignments)   # (d, N)
            value = float((metric64 * (diff @ diff.T)).sum())
        objective.append(value / scale)
        if it == n_iter:
            break
        if bool((counts == 0).any()):
            before = assignments
            assignments, n_rep = _repair_empty(w, assignments, counts, centroids)
            if n_rep:
                split = torch.nonzero(assignments != before).flatten()
                stale[before[split]] = True
                stale[assignments[split]] = True
                repaired += n_rep
                sums = _move_sums(sums, w64, split, before[split], assignments[split])
                counts = torch.bincount(assignments, minlength=k)
                c64 = centroids.double()
        # M-step: the float64 mean (the sum of the members over their number: exact when all
        # members coincide) of the clusters whose members changed since their centroid was set
        # (the others keep it: once nothing moves, nothing changes)
        fresh = torch.where((counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64), c64)
        means64 = torch.where(stale.unsqueeze(1), fresh, means64)
        centroids = torch.where(stale.unsqueeze(1), fresh.to(w.dtype), centroids)
        stale.zero_()
    return Codebook(centroids, assignments, tuple(objective), repaired)


def relative_error(weight: Tensor, decoded: Tensor) -> float:
    """``||W - Ŵ||² / ||W||²`` (weights-only diagnostic)."""
    num = float((weight - decoded).pow(2).sum())
    den = float(weight.pow(2).sum())
    return num / den if den > 0 else math.inf if num > 0 else 0.0
