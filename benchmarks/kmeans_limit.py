"""k-means at the CPU limit: ``fit_codebook`` against faiss on the same problem.

Under the pooled metric ``G = L Lᵀ`` (Cholesky), ``(w - c)ᵀ G (w - c) =
||Lᵀw - Lᵀc||²``: faiss' Euclidean k-means on the transformed subvectors
``z = Lᵀw`` solves exactly the paper's problem. Both sides start from the same
``K`` random subvectors (``fit_codebook(..., n_iter=0, init="random")``) and
run the same number of iterations; faiss is told not to subsample
(``max_points_per_centroid``), so both see every subvector.

Cases: ResNet-50 shapes, ``K = 256``, Kaiming-normal weights, a metric
``G = XᵀX`` from channel-correlated random inputs (condition ~10-100):

- ``64->64 3x3`` (d = 9, 4,096 subvectors), ``256->256 3x3`` (65,536),
  ``512->512 3x3`` (262,144), ``512->2048 1x1`` (d = 4, 262,144).

Timing: one thread on both sides (``torch.set_num_threads(1)``,
``faiss.omp_set_num_threads(1)``), the two sides interleaved in the same
process (ours lloyd, faiss, ours hartigan, repeated), the median of
``--repeats`` fits per side in CPU time of the working thread
(``time.thread_time``: the time other processes hold the core does not count),
divided by ``n_iter``: the ratio is
``ours / faiss`` per iteration. ``fit_codebook`` runs one more assignment
step than faiss (its iteration 0, against the initial centroids); the
objective of faiss' result is taken with its last centroids and the nearest
assignment to them (one more E-step), so both results have ``n_iter``
M-steps and ``n_iter + 1`` assignment steps.

Objective: ``Σ (w - ŵ)ᵀ G (w - ŵ) / Σ wᵀ G w`` in float64 for both results.

Backends: ``fit_codebook``'s own E-step (``torch``, the default) and its E-step on
faiss' exhaustive search (``faiss``, ``quantize.kmeans_backend: faiss``; the
M-step, the exact float64 checks and the Hartigan moves stay ours); one line per
case and backend.

Usage::

    python -m benchmarks.kmeans_limit                  # all cases, ~5 min (1 thread)
    python -m benchmarks.kmeans_limit --cases 64x64 --repeats 1
    python -m benchmarks.kmeans_limit --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.core.layouts import LayerGeometry, to_subvectors

log = logging.getLogger("kmeans_limit")

N_CENTROIDS = 256
TARGET_LLOYD = 2.0
TARGET_HARTIGAN = 2.5
TARGET_OBJECTIVE = 1.001


@dataclass(frozen=True)
class Case:
    name: str
    c_in: int
    c_out: int
    kernel: int

    @property
    def block_size(self) -> int:
        return 9 if self.kernel == 3 else 4

    @property
    def geometry(self) -> LayerGeometry:
        k = self.kernel
        return LayerGeometry("conv2d", (self.c_out, self.c_in, k, k), padding=(k // 2, k // 2))


CASES = {c.name: c for c in (
    Case("64x64", 64, 64, 3),
    Case("256x256", 256, 256, 3),
    Case("512x512", 512, 512, 3),
    Case("512x2048-1x1", 512, 2048, 1),
)}


def make_problem(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, metric): Kaiming-normal weight and ``G = XᵀX / n`` of correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = case.c_in * case.kernel ** 2
    weight = torch.randn(case.geometry.weight_shape, generator=gen) * math.sqrt(2.0 / fan_in)
    d = case.block_size
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d) + 2.0 * torch.eye(d)
    x = torch.relu(torch.randn(4096, d, generator=gen) @ mix + 0.3)
    return weight.contiguous(), (x.T @ x / x.shape[0]).float()


def objective(w64: torch.Tensor, c64: torch.Tensor, a: torch.Tensor, g64: torch.Tensor) -> float:
    diff = w64 - c64[a]
    return float((g64 * (diff.T @ diff)).sum() / (g64 * (w64.T @ w64)).sum())


def run_faiss(z, init_z, n_iter: int, seed: int):
    import faiss

    n, d = z.shape
    k = init_z.shape[0]
    km = faiss.Kmeans(d, k, niter=n_iter, seed=seed, max_points_per_centroid=n // k + 1,
                      min_points_per_centroid=1, verbose=False)
    km.train(z, init_centroids=init_z)
    return km.centroids


@dataclass
class Result:
    case: str
    backend: str                 # the E-step of fit_codebook: torch (default) | faiss (quantize.kmeans_backend)
    n_subvectors: int
    block_size: int
    n_iter: int
    faiss_s_per_it: float
    lloyd_s_per_it: float
    hartigan_s_per_it: float
    lloyd_ratio: float
    hartigan_ratio: float
    faiss_objective: float
    lloyd_objective: float
    hartigan_objective: float
    lloyd_objective_ratio: float
    hartigan_objective_ratio: float

    def ok(self) -> bool:
        return (self.lloyd_ratio <= TARGET_LLOYD and self.hartigan_ratio <= TARGET_HARTIGAN
                and self.lloyd_objective_ratio <= TARGET_OBJECTIVE
                and self.hartigan_objective_ratio <= TARGET_OBJECTIVE)

    def summary(self) -> str:
        return (f"kmeans_limit case={self.case} backend={self.backend} n={self.n_subvectors} d={self.block_size} "
                f"iters={self.n_iter} faiss={self.faiss_s_per_it * 1e3:.2f} ms/it lloyd={self.lloyd_s_per_it * 1e3:.2f} "
                f"ms/it ({self.lloyd_ratio:.2f}x) hartigan={self.hartigan_s_per_it * 1e3:.2f} ms/it "
                f"({self.hartigan_ratio:.2f}x) objective faiss={self.faiss_objective:.5f} "
                f"lloyd={self.lloyd_objective:.5f} ({self.lloyd_objective_ratio:.4f}x) "
                f"hartigan={self.hartigan_objective:.5f} ({self.hartigan_objective_ratio:.4f}x) "
                f"targets: lloyd<={TARGET_LLOYD}x hartigan<={TARGET_HARTIGAN}x objective<={TARGET_OBJECTIVE}x "
                f"{'ok' if self.ok() else 'MISSED'}")


def run_case(case: Case, args: argparse.Namespace) -> list[Result]:
    from bgd_dist.kmeans_faiss import faiss_search

    weight, metric = make_problem(case, args.data_seed)
    geometry, d = case.geometry, case.block_size
    w = to_subvectors(weight, geometry, d).contiguous()
    g64 = metric.double()
    lower = torch.linalg.cholesky(g64)                     # G = L Lᵀ
    z = (w.double() @ lower).float().numpy()               # rows Lᵀw
    init = fit_codebook(weight, geometry, metric, N_CENTROIDS, d, n_iter=0, init="random",
                        seed=args.seed).centroids
    init_z = (init.double() @ lower).float().numpy()
    sides = ["faiss"] + [f"{refine}/{backend}" for backend in args.backends for refine in ("lloyd", "hartigan")]
    times: dict[str, list[float]] = {side: [] for side in sides}
    results = {}
    for rep in range(args.repeats + 1):                    # repeat 0: warm-up, not timed
        for side in sides:                                 # interleaved: a load change hits every side
            t = time.thread_time()
            if side == "faiss":
                out = run_faiss(z, init_z, args.n_iter, args.seed)
            else:
                refine, backend = side.split("/")
                out = fit_codebook(weight, geometry, metric, N_CENTROIDS, d, n_iter=args.n_iter, init="random",
                                   seed=args.seed, refine=refine, search=faiss_search if backend == "faiss" else None)
            elapsed = (time.thread_time() - t) / args.n_iter
            if rep:
                times[side].append(elapsed)
            results[side] = out
        log.info("%s repeat %d: %s", case.name, rep,
                 " ".join(f"{s}={v[-1] * 1e3:.2f}ms/it" for s, v in times.items() if v))
    w64 = w.double()
    cz = torch.from_numpy(results["faiss"]).double()
    c_faiss = torch.linalg.solve_triangular(lower.T, cz.T, upper=True).T  # c = L⁻ᵀ c_z
    zz = torch.from_numpy(z).double()
    a_faiss = torch.cdist(zz, cz).argmin(1)
    obj = {"faiss": objective(w64, c_faiss, a_faiss, g64)}
    for side in sides[1:]:
        cb = results[side]
        obj[side] = objective(w64, cb.centroids.double(), cb.assignments, g64)
    med = {s: statistics.median(v) for s, v in times.items()}
    return [Result(case.name, b, w.shape[0], d, args.n_iter, med["faiss"], med[f"lloyd/{b}"], med[f"hartigan/{b}"],
                   med[f"lloyd/{b}"] / med["faiss"], med[f"hartigan/{b}"] / med["faiss"], obj["faiss"],
                   obj[f"lloyd/{b}"], obj[f"hartigan/{b}"], obj[f"lloyd/{b}"] / obj["faiss"],
                   obj[f"hartigan/{b}"] / obj["faiss"]) for b in args.backends]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="fit_codebook vs faiss k-means on the same problem, one thread.")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--n-iter", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed fits per side (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (the shared random init)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", choices=("torch", "faiss"), default=["torch", "faiss"],
                   help="E-step of fit_codebook (quantize.kmeans_backend)")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> list[Result]:
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    log.info("torch %s, faiss %s, one thread", torch.__version__, faiss.__version__)
    out = []
    for name in args.cases:
        for res in run_case(CASES[name], args):
            print(res.summary(), flush=True)
            out.append(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in out], indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(get_args_parser().parse_args())
