"""EM speed benchmark: the paper's own k-means procedure against ``fit_codebook``.

Two ResNet-50-sized 3x3 convolutions (METHOD.md §1-§2, d = 9, K = 256):

- ``layer3``: 256 -> 256 channels, inputs of 32 images of 14x14;
- ``layer1``: 64 -> 64 channels, inputs of 32 images of 56x56.

For each case the script reports the time of one EM iteration of both methods
on CPU and the final *true* objective of both,
``||conv(A, W) - conv(A, Ŵ)||² / ||conv(A, W)||²`` over ALL the activations
(padding 1, stride 1), averaged over seeds, at the same iteration count.

The baseline (:class:`ReferenceEM`) follows the public reference
(facebookresearch/kill-the-bits, ``src/quantization/pq.py``, ``em.py``,
``distance.py``, ``solver.py``, ``utils/dynamic_sampling.py``):

- the raw im2col'd input activations are kept whole (``in_activations``);
- every iteration draws ``n_samples // C_out`` im2col rows at random, with
  replacement, and unrolls them block by block into ``X_s``
  (``n_samples`` = 25000 for layer3/4, 1000 for layer1/2, so ``X_s`` holds
  24832 resp. 960 rows of ``d`` values);
- E-step: ``||X_s (w - c)||²`` for every subvector ``w`` and centroid ``c`` by
  brute-force broadcasting, i.e. materialising ``X_s @ (M - c)`` chunk by
  chunk (the reference's ``Distances.forward``), then argmin over centroids;
  the only liberty taken is ``.square_().sum(1)`` instead of
  ``.norm(p=2, dim=1).pow(2)`` (same value, 2-3x faster on CPU: it favours
  the baseline);
- empty clusters: pick an empty cluster at random, copy the most populated
  centroid into it, perturb both by ``±eps·noise`` (eps = 1e-8) and re-run the
  whole E-step, until none is empty. The reference loops forever when the
  split does not separate anything; here the loop stops after ``K`` rounds;
- M-step: for every cluster ``k`` with members ``M_k`` the reference forms
  ``B = X_s @ M_k`` and solves the stacked least-squares problem
  ``min_c Σ_i ||X_s c - X_s w_i||²`` = ``min_c ||X_s c - mean_i B_i||²``
  (``solve_stack``, with a pseudo-inverse computed once per iteration). Here
  the per-cluster ``B`` is materialised the same way and all clusters are
  solved by one ``torch.linalg.lstsq(X_s, [b_1 .. b_K])``;
- the returned quantized weight is ``centroids[assignments]`` with the
  assignments of the last E-step and the centroids of the last M-step
  (``PQ.decode``).
- init: the same ``K`` random subvectors as ``fit_codebook(init="random")``
  with the same seed (taken from ``fit_codebook(..., n_iter=0)``; the
  reference draws them with replacement, ``torch.randint``).

Everything runs on CPU (the reference spreads the E-step over up to 8 GPUs
with ``DataParallel``). Cost: one brute-force E-step of the layer3 case takes
~7 minutes on one CPU thread (up to an hour with two threads on a loaded
2-core machine), so a full 20-iteration brute-force run per seed is out of
reach. The benchmark
therefore separates timing from the objective comparison:

- timing: the first ``--timed-iters`` iterations of the first seed run the
  brute-force E-step and the materialised M-step; the per-iteration time is
  the median over them (the machine may be shared: the median resists other
  processes' bursts; the mean is in the JSON too). When a brute-force E-step
  does not finish within ``--brute-budget`` seconds, it stops after the
  centroids done so far and its time is scaled by ``K / centroids done`` (every
  centroid is the same matmul over the same shapes, so the cost is linear in
  the number of centroids; the summary line says so). The assignments then
  come from the algebraically identical form below, and the brute-force
  distances that were computed are checked against it;
- all other iterations compute the same quantities through the identity
  ``||X_s (w - c)||² = (w - c)ᵀ (X_sᵀ X_s) (w - c)`` (float64) and
  ``mean_i X_s w_i = X_s mean_i w_i`` — the same sample, the same random
  stream, the same ``lstsq``, i.e. the same algorithm up to rounding.
  ``--full-brute`` runs every iteration by brute force instead (feasible for
  layer1 only; it checks that the final objective does not move).

Ours: :class:`~bgd_dist.core.stats.GramStats` over ALL the activations
(streamed, printed once as a one-off cost), then
:func:`~bgd_dist.core.kmeans.fit_codebook` with its default
``refine="hartigan"``: one iteration is an M-step and one assignment step:
while Lloyd moves touch more than half of the clusters, an exact E-step of
every subvector against every centroid followed by a batched Hartigan round on
the clusters it left unchanged (a second pass of the same size), afterwards the
Hartigan round alone (one pass); the ``n_iter`` iterations of both methods are
compared. Plain Lloyd
(``refine="lloyd"``) stalls early on ``layer1`` (16 subvectors per centroid) in
a poorer fixed point: ~3% above the baseline there, where the baseline's
re-sampling noise acts like annealing. The per-iteration time of ours is the fit
time divided by ``n_iter`` (after one untimed warm-up fit), the median over
seeds x ``--repeats`` fits (the fit is deterministic; repeats only time it).

Besides the true objective, the log and the JSON give each result's value of
the full-Gram proxy ``Σ (w - ŵ)ᵀ G (w - ŵ) / Σ wᵀ G w`` (what ``fit_codebook``
minimises, and what the baseline estimates by sampling): it separates how
well each method optimises from how far the proxy is from the true objective.

Threads: one by default (``--threads`` to change). The brute-force E-step is
thousands of small kernels per centroid; with two OpenMP threads on a
2-core machine that other processes also use, every kernel waits for a
descheduled thread, which measured 10-30x slowdowns of the baseline (and
2-10x of ours) that come and go with the load. Single-threaded timings are
stable from run to run; on an idle machine ``--threads 2`` roughly halves
both sides.

Activations are post-ReLU, spatially smooth, channel-correlated random fields
(a low-rank channel mixture of blurred noise, per-channel scale and bias); the
weights are Kaiming-normal plus a small smooth (blurred-delta) component per
kernel, as trained 3x3 filters tend to be. Everything is seeded.

Usage::

    python -m benchmarks.em_speed                # full run, ~2 min (1 thread)
    python -m benchmarks.em_speed --quick        # smoke run, ~30 s
    python -m benchmarks.em_speed --json out.json --seeds 0 1 2 --n-iter 20
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.core.layouts import LayerGeometry, from_subvectors, input_rows, to_subvectors
from bgd_dist.core.stats import make_stats

log = logging.getLogger("em_speed")

BLOCK_SIZE = 9
N_CENTROIDS = 256
EPS = 1e-8                  # reference --eps, empty-cluster split
CHUNK_ELEMS = 1 << 20       # brute-force chunk: kc * n_s * nw floats (fastest on a 2-core CPU)
TARGET_SPEEDUP = 100.0
TARGET_RATIO = 1.01


@dataclass(frozen=True)
class Case:
    """One benchmarked 3x3 convolution (stride 1, padding 1)."""

    name: str
    c_in: int
    c_out: int
    n_images: int
    size: int
    n_samples: int          # reference dynamic_sampling(layer)

    @property
    def label(self) -> str:
        return f"{self.c_in}->{self.c_out} 3x3, {self.n_images}x{self.size}x{self.size}"

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry("conv2d", (self.c_out, self.c_in, 3, 3), padding=(1, 1))


CASES = {
    "layer3": Case("layer3", 256, 256, 32, 14, 25000),
    "layer1": Case("layer1", 64, 64, 32, 56, 1000),
}


# --------------------------------------------------------------------------- data


def make_activations(case: Case, gen: torch.Generator) -> Tensor:
    """Post-ReLU, spatially smooth, channel-correlated inputs ``(N, C_in, H, W)``."""
    n, c, s = case.n_images, case.c_in, case.size
    rank = max(4, c // 8)
    latent = torch.randn(n, rank, s, s, generator=gen)
    latent = F.avg_pool2d(latent, 3, stride=1, padding=1, count_include_pad=False) * 3.0
    mix = torch.randn(c, rank, generator=gen) / math.sqrt(rank)
    x = torch.einsum("cr,nrhw->nchw", mix, latent) + 0.5 * torch.randn(n, c, s, s, generator=gen)
    scale = torch.exp(0.5 * torch.randn(c, generator=gen)).view(1, c, 1, 1)
    bias = (0.5 * torch.randn(c, generator=gen)).view(1, c, 1, 1)
    return torch.relu(x * scale + bias).contiguous()


def make_weight(case: Case, gen: torch.Generator) -> Tensor:
    """Kaiming-normal 3x3 weight plus a smooth component per kernel."""
    fan_in = case.c_in * 9
    std = math.sqrt(2.0 / fan_in)
    w = torch.randn(case.c_out, case.c_in, 3, 3, generator=gen) * std
    bump = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 4.0
    amp = torch.randn(case.c_out, case.c_in, 1, 1, generator=gen) * std
    return (w + amp * bump).contiguous()


class TrueObjective:
    """``||conv(A, W) - conv(A, Ŵ)||² / ||conv(A, W)||²`` over all of ``A``."""

    def __init__(self, acts: Tensor, weight: Tensor, batch: int = 8):
        self.acts, self.weight, self.batch = acts, weight, batch
        self.den = self._energy(weight)

    def _energy(self, weight: Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for a in self.acts.split(self.batch):
                total += float(F.conv2d(a, weight, padding=1).double().pow(2).sum())
        return total

    def __call__(self, w_hat: Tensor) -> float:
        # conv is linear in the weight: conv(A, W) - conv(A, Ŵ) = conv(A, W - Ŵ)
        return self._energy(self.weight - w_hat) / self.den


def gram_objective(w: Tensor, w_hat: Tensor, metric: Tensor) -> float:
    """``Σ (w - ŵ)ᵀ G (w - ŵ) / Σ wᵀ G w``: the proxy both methods minimise, under the full ``G``."""
    g = metric.double()
    diff = (w - w_hat).double()
    return float(((diff @ g) * diff).sum() / ((w.double() @ g) * w.double()).sum())


# --------------------------------------------------------------------------- baseline


def brute_force_distances(x_s: Tensor, w: Tensor, centroids: Tensor,
                          budget_s: float | None = None) -> tuple[Tensor, int, float]:
    """The reference E-step: ``||X_s (w - c)||²`` for every (centroid, subvector).

    ``X_s @ (M - c)`` is materialised chunk by chunk, as in the reference's
    ``Distances.forward`` (``M`` = subvectors as columns). Stops after the
    centroid chunk that exceeds ``budget_s`` seconds. Returns (distances of the
    centroids done ``(k_done, n)``, ``k_done``, seconds).
    """
    n_s = x_s.shape[0]
    k, n = centroids.shape[0], w.shape[0]
    nw = max(1, min(n, CHUNK_ELEMS // n_s))
    kc = max(1, min(k, CHUNK_ELEMS // (n_s * nw)))
    m = w.T.contiguous()                                       # (d, n): the reference's M
    x3 = x_s.unsqueeze(0)                                      # (1, n_s, d)
    out = torch.empty(k, n, dtype=x_s.dtype)
    start = time.perf_counter()
    done = 0
    for c0 in range(0, k, kc):
        cc = centroids[c0:c0 + kc]
        for w0 in range(0, n, nw):
            diff = m[None, :, w0:w0 + nw] - cc[:, :, None]     # (kc, d, nw)
            out[c0:c0 + kc, w0:w0 + nw] = torch.matmul(x3, diff).square_().sum(1)
        done = c0 + cc.shape[0]
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return out[:done], done, time.perf_counter() - start


def gram_distances(x_s: Tensor, w: Tensor, centroids: Tensor) -> Tensor:
    """The same distances as :func:`brute_force_distances` via ``G_s = X_sᵀX_s``, float64, ``(K, n)``."""
    g = x_s.double().T @ x_s.double()
    wd, cd = w.double(), centroids.double()
    cg = cd @ g
    return ((cg * cd).sum(1)[:, None] - 2.0 * cg @ wd.T + ((wd @ g) * wd).sum(1)[None, :]).clamp_min_(0)


@dataclass
class StepReport:
    """Costs of one baseline iteration (E-step seconds may be extrapolated)."""

    sample_s: float = 0.0
    estep_s: float = 0.0
    mstep_s: float = 0.0
    estep_call_s: float = 0.0      # cost of one E-step call (repair rounds repeat it)
    split_rounds: int = 0
    unresolved_empty: int = 0
    centroids_timed: int = 0       # centroids the brute-force E-step actually covered (timed steps)
    max_rel_diff: float | None = None   # brute force vs Gram form, on the centroids covered
    argmin_agreement: float | None = None

    @property
    def total_s(self) -> float:
        return self.sample_s + self.estep_s + self.mstep_s


class ReferenceEM:
    """The reference's EM for one layer (see the module docstring for what is faithful).

    rows: the raw im2col'd activations ``(n_pixels, C_in*9)``, kept whole;
    w: the subvectors ``(n_blocks*C_out, d)`` in block-major order;
    centroids: the initial ``(K, d)`` codebook.
    """

    def __init__(self, rows: Tensor, w: Tensor, centroids: Tensor, c_out: int, n_samples: int,
                 gen: torch.Generator, eps: float = EPS):
        self.rows, self.w = rows, w
        self.d = w.shape[1]
        self.n_blocks = rows.shape[1] // self.d
        self.centroids = centroids.clone()
        self.k = centroids.shape[0]
        self.n_draw = max(1, n_samples // c_out)     # reference: n_samples // M.size(1)
        self.gen, self.eps = gen, eps
        self.assignments = torch.zeros(w.shape[0], dtype=torch.long)
        self.max_split_rounds = self.k

    def sample(self) -> Tensor:
        """``n_samples // C_out`` random im2col rows, unrolled block-major to ``(n_draw*n_blocks, d)``."""
        idx = torch.randint(self.rows.shape[0], (self.n_draw,), generator=self.gen)
        x = self.rows[idx].reshape(self.n_draw, self.n_blocks, self.d)
        return x.transpose(0, 1).reshape(-1, self.d).contiguous()

    def _assign(self, x_s: Tensor, brute: bool, budget_s: float | None, report: StepReport) -> Tensor:
        if not brute:
            t = time.perf_counter()
            a = gram_distances(x_s, self.w, self.centroids).argmin(0)
            report.estep_call_s = time.perf_counter() - t
            report.estep_s += report.estep_call_s
            return a
        if 0 < report.centroids_timed < self.k:
            # repair round of a step whose E-step was timed partially: same shapes, same cost
            report.estep_s += report.estep_call_s
            return gram_distances(x_s, self.w, self.centroids).argmin(0)
        dist, done, secs = brute_force_distances(x_s, self.w, self.centroids, budget_s)
        report.centroids_timed = done
        ref = gram_distances(x_s, self.w, self.centroids)
        if done == self.k:
            report.estep_call_s = secs
            a = dist.argmin(0)
            report.argmin_agreement = float((ref.argmin(0) == a).double().mean())
        else:
            report.estep_call_s = secs * self.k / done
            a = ref.argmin(0)
        report.estep_s += report.estep_call_s
        scale = float(ref[:done].abs().max().clamp_min(1e-30))
        report.max_rel_diff = float((dist.double() - ref[:done]).abs().max()) / scale
        return a

    def _mstep(self, x_s: Tensor, assignments: Tensor, faithful: bool) -> None:
        """Least squares per cluster: ``min_c ||X_s c - mean_i X_s w_i||²`` (stacked system)."""
        counts = torch.bincount(assignments, minlength=self.k)
        if faithful:
            rhs = torch.zeros(x_s.shape[0], self.k, dtype=x_s.dtype)
            for k in torch.nonzero(counts).flatten().tolist():
                b = x_s @ self.w[assignments == k].T          # reference: B = in_activations.mm(M_k)
                rhs[:, k] = b.sum(1) / b.shape[1]             # reference solve_stack: B.sum(1) / B.size(1)
        else:                                                 # same right-hand side by linearity
            sums = torch.zeros(self.k, self.d, dtype=self.w.dtype).index_add_(0, assignments, self.w)
            rhs = x_s @ (sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)).T
        sol = torch.linalg.lstsq(x_s, rhs).solution.T         # (K, d)
        nonempty = counts > 0
        self.centroids[nonempty] = sol[nonempty].to(self.centroids.dtype)

    def step(self, brute: bool = False, budget_s: float | None = None) -> StepReport:
        """One iteration: sample, E-step, bounded empty-cluster splits, M-step."""
        report = StepReport()
        t = time.perf_counter()
        x_s = self.sample()
        report.sample_s = time.perf_counter() - t
        assignments = self._assign(x_s, brute, budget_s, report)
        while True:
            counts = torch.bincount(assignments, minlength=self.k)
            empty = torch.nonzero(counts == 0).flatten()
            if empty.numel() == 0:
                break
            if report.split_rounds >= self.max_split_rounds:
                report.unresolved_empty = int(empty.numel())
                break
            k = int(empty[torch.randint(empty.numel(), (1,), generator=self.gen)])
            m = int(torch.argmax(counts))
            e = torch.randn(self.d, generator=self.gen, dtype=self.centroids.dtype) * self.eps
            self.centroids[k] = self.centroids[m] + e
            self.centroids[m] -= e
            report.split_rounds += 1
            assignments = self._assign(x_s, brute, budget_s, report)
        t = time.perf_counter()
        self._mstep(x_s, assignments, faithful=brute)
        report.mstep_s = time.perf_counter() - t
        self.assignments = assignments
        return report

    def decode_subvectors(self) -> Tensor:
        return self.centroids[self.assignments]


# --------------------------------------------------------------------------- benchmark


@dataclass
class CaseResult:
    case: str
    label: str
    n_iter: int
    seeds: list[int]
    n_samples: int
    n_sample_rows: int
    baseline_s_per_it: float       # median over the timed iterations
    ours_s_per_it: float           # median over seeds x repeats
    baseline_s_per_it_mean: float
    ours_s_per_it_mean: float
    speedup: float
    stats_s: float
    objective_baseline: list[float]
    objective_ours: list[float]
    objective_baseline_mean: float
    objective_ours_mean: float
    ratio: float
    speedup_ok: bool
    ratio_ok: bool
    baseline_estep_centroids_timed: list[int]    # per timed iteration, out of N_CENTROIDS
    baseline_timed_steps: list[dict] = field(default_factory=list)
    baseline_split_rounds: list[int] = field(default_factory=list)
    baseline_unresolved_empty: list[int] = field(default_factory=list)
    ours_gram_objective: list[float] = field(default_factory=list)      # under the full Gram metric
    baseline_gram_objective: list[float] = field(default_factory=list)  # same, for the baseline's result
    ours_times: list[float] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)    # 1-min load average at start and end
    full_brute: bool = False
    threads: int = 1

    def summary(self) -> str:
        partial = ""
        lo, hi = min(self.baseline_estep_centroids_timed), max(self.baseline_estep_centroids_timed)
        if lo < N_CENTROIDS:
            span = str(lo) if lo == hi else f"{lo}-{hi}"
            partial = f" (E-step brute force timed on {span}/{N_CENTROIDS} centroids, scaled)"
        return (
            f"em_speed case={self.case} ({self.label}) iters={self.n_iter} threads={self.threads} "
            f"baseline={self.baseline_s_per_it:.3f} s/it{partial} ours={self.ours_s_per_it:.4f} s/it "
            f"(medians) speedup={self.speedup:.0f}x objective baseline={self.objective_baseline_mean:.4f} "
            f"ours={self.objective_ours_mean:.4f} ratio={self.ratio:.3f} (mean of {len(self.seeds)} seeds) "
            f"targets: speedup>={TARGET_SPEEDUP:.0f}x {'ok' if self.speedup_ok else 'MISSED'}, "
            f"ratio<={TARGET_RATIO} {'ok' if self.ratio_ok else 'MISSED'}"
        )


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def run_case(case: Case, args: argparse.Namespace) -> CaseResult:
    load_start = _load()
    gen = torch.Generator().manual_seed(args.data_seed)
    acts = make_activations(case, gen)
    weight = make_weight(case, gen)
    geometry = case.geometry
    objective = TrueObjective(acts, weight)
    w_sub = to_subvectors(weight, geometry, BLOCK_SIZE, case.name).contiguous()

    # ours: Gram statistics over ALL activations (one-off), then k-means under the metric
    t = time.perf_counter()
    stats = make_stats("gram", geometry, BLOCK_SIZE, layer=case.name)
    for batch in acts.split(8):
        stats.update(batch)
    metric = stats.metric()
    stats_s = time.perf_counter() - t
    log.info("%s: Gram statistics over %d rows in %.3f s (one-off)", case.name, stats.n_rows, stats_s)
    fit_codebook(weight, geometry, metric, N_CENTROIDS, BLOCK_SIZE, n_iter=1, seed=0, name=case.name)  # warm-up

    ours_obj, ours_times, ours_gram = [], [], []
    for seed in args.seeds:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            cb = fit_codebook(weight, geometry, metric, N_CENTROIDS, BLOCK_SIZE, n_iter=args.n_iter,
                              init="random", seed=seed, name=case.name)
            times.append((time.perf_counter() - t) / args.n_iter)
        ours_times += times
        ours_obj.append(objective(cb.decode(geometry, case.name)))
        ours_gram.append(gram_objective(w_sub, cb.centroids[cb.assignments], metric))
        log.info("%s seed=%d ours: %s s/it, true objective %.5f", case.name, seed,
                 " ".join(f"{x:.4f}" for x in times), ours_obj[-1])

    # baseline: raw im2col activations kept whole
    rows = torch.cat(list(input_rows(acts, geometry)))
    base_obj, base_gram, timed, split_rounds, unresolved = [], [], [], [], []
    for i, seed in enumerate(args.seeds):
        init = fit_codebook(weight, geometry, metric, N_CENTROIDS, BLOCK_SIZE, n_iter=0,
                            init="random", seed=seed, name=case.name).centroids
        em = ReferenceEM(rows, w_sub, init, case.c_out, case.n_samples,
                         torch.Generator().manual_seed(10_000 + seed))
        rounds = unres = 0
        for it in range(args.n_iter):
            is_timed = i == 0 and it < args.timed_iters
            rep = em.step(brute=is_timed or args.full_brute, budget_s=args.brute_budget if is_timed else None)
            rounds += rep.split_rounds
            unres = max(unres, rep.unresolved_empty)
            if is_timed:
                timed.append(asdict(rep) | {"total_s": rep.total_s, "iteration": it})
                log.info("%s baseline timed it=%d: %.3f s (sample %.3f, E-step %.3f on %d/%d centroids, "
                         "M-step %.3f, splits %d); brute vs Gram form max rel diff %.1e%s",
                         case.name, it, rep.total_s, rep.sample_s, rep.estep_s, rep.centroids_timed,
                         N_CENTROIDS, rep.mstep_s, rep.split_rounds, rep.max_rel_diff or 0.0,
                         "" if rep.argmin_agreement is None else f", argmin agreement {rep.argmin_agreement:.5f}")
        w_hat = from_subvectors(em.decode_subvectors(), geometry, BLOCK_SIZE, case.name)
        base_obj.append(objective(w_hat))
        base_gram.append(gram_objective(w_sub, em.decode_subvectors(), metric))
        split_rounds.append(rounds)
        unresolved.append(unres)
        log.info("%s seed=%d baseline: true objective %.5f, full-Gram objective %.5f (ours %.5f), %d split rounds",
                 case.name, seed, base_obj[-1], base_gram[-1], ours_gram[i], rounds)

    base_times = [r["total_s"] for r in timed]
    base_s = statistics.median(base_times)
    ours_s = statistics.median(ours_times)
    base_mean = sum(base_obj) / len(base_obj)
    ours_mean = sum(ours_obj) / len(ours_obj)
    speedup = base_s / ours_s
    ratio = ours_mean / base_mean
    return CaseResult(
        case=case.name, label=case.label, n_iter=args.n_iter, seeds=list(args.seeds),
        n_samples=case.n_samples, n_sample_rows=em.n_draw * em.n_blocks,
        baseline_s_per_it=base_s, ours_s_per_it=ours_s, baseline_s_per_it_mean=statistics.fmean(base_times),
        ours_s_per_it_mean=statistics.fmean(ours_times), speedup=speedup, stats_s=stats_s,
        objective_baseline=base_obj, objective_ours=ours_obj,
        objective_baseline_mean=base_mean, objective_ours_mean=ours_mean, ratio=ratio,
        speedup_ok=speedup >= TARGET_SPEEDUP, ratio_ok=ratio <= TARGET_RATIO,
        baseline_estep_centroids_timed=[r["centroids_timed"] for r in timed],
        baseline_timed_steps=timed, baseline_split_rounds=split_rounds,
        baseline_unresolved_empty=unresolved, ours_gram_objective=ours_gram,
        baseline_gram_objective=base_gram, ours_times=ours_times,
        load_average=[load_start, _load()], full_brute=args.full_brute, threads=args.threads,
    )


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Per-iteration speed and final output objective: the paper's brute-force EM vs fit_codebook.")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["layer3", "layer1"])
    p.add_argument("--n-iter", type=int, default=None, help="EM iterations for both methods (default 20, quick 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="k-means seeds (default 0 1 2, quick 0)")
    p.add_argument("--timed-iters", type=int, default=None,
                   help="baseline iterations timed with the brute-force E-step (default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed fits of ours per seed (default 3, quick 1)")
    p.add_argument("--brute-budget", type=float, default=None,
                   help="seconds after which a timed brute-force E-step stops and is scaled to all "
                        "centroids (default 8, quick 2)")
    p.add_argument("--full-brute", action="store_true",
                   help="run every baseline iteration by brute force (hours for layer3)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the activations and weights")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both methods (default 1: stable timings on a shared "
                        "machine; 0 keeps torch's default)")
    p.add_argument("--quick", action="store_true", help="fast smoke run")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    return p


def main(args: argparse.Namespace) -> list[CaseResult]:
    defaults = {"n_iter": (20, 4), "seeds": ([0, 1, 2], [0]), "timed_iters": (3, 1), "repeats": (3, 1),
                "brute_budget": (8.0, 2.0)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.n_iter < 1 or args.timed_iters < 1 or args.repeats < 1:
        raise SystemExit("--n-iter, --timed-iters and --repeats must be >= 1")
    args.timed_iters = min(args.timed_iters, args.n_iter)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    log.info("torch %s, %d threads, n_iter=%d, seeds=%s", torch.__version__, torch.get_num_threads(),
             args.n_iter, args.seeds)
    results = []
    for name in args.cases:
        t = time.perf_counter()
        res = run_case(CASES[name], args)
        log.info("%s done in %.1f s", name, time.perf_counter() - t)
        results.append(res)
        print(res.summary(), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"torch": torch.__version__, "threads": torch.get_num_threads(), "block_size": BLOCK_SIZE,
                   "n_centroids": N_CENTROIDS, "targets": {"speedup": TARGET_SPEEDUP, "ratio": TARGET_RATIO},
                   "cases": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(get_args_parser().parse_args())
