"""Fit time of the ``hessian`` objective against the paper's, per layer, on real layer shapes.

For every case the paper fit (:func:`~bgd_dist.core.kmeans.fit_codebook` under the
pooled metric of ``H``) and the Hessian fit
(:func:`~bgd_dist.core.hessian.fit_codebook_hessian`, which starts with that same
paper fit) run one after the other in the same process, one thread, with the
paper's 100 EM iterations; the ratio is ``hessian / paper``. Times are the CPU time of
the one working thread (``time.thread_time``): on a shared machine, the time other
processes hold the core does not count. ``--stall 0``
disables the early stops (CG solves and rounds run to their limits, as before
they existed) for comparison.

Shapes: ResNet-50 layer3 and layer4 (3x3 d = 9; 1x1 d = 4) and the R50-FPN box
head ``fc6`` (Linear 12544 -> 1024, d = 16), ``K = 256``. The statistics are
smaller than a run's: ``H = XᵀX / n + ridge`` from ``--rows`` post-ReLU,
channel-correlated random input rows (real layers see millions), which only
changes what ``H`` contains, not the cost of anything in the fit.

Usage::

    python -m benchmarks.hessian_speed                         # layer3 + layer4 shapes, ~15 min
    python -m benchmarks.hessian_speed --cases layer3.conv2 --n-iter 100
    python -m benchmarks.hessian_speed --cases fc6             # 1.2 GB H, slow
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bgd_dist.core.hessian import fit_codebook_hessian, pooled_metric
from bgd_dist.core.kmeans import clamp_n_centroids, fit_codebook
from bgd_dist.core.layouts import LayerGeometry

log = logging.getLogger("hessian_speed")
TARGET_RATIO = 3.0

CASES = {
    "layer3.conv1": (LayerGeometry("conv2d", (256, 1024, 1, 1)), 4),
    "layer3.conv2": (LayerGeometry("conv2d", (256, 256, 3, 3), padding=(1, 1)), 9),
    "layer3.conv3": (LayerGeometry("conv2d", (1024, 256, 1, 1)), 4),
    "layer4.conv1": (LayerGeometry("conv2d", (512, 2048, 1, 1)), 4),
    "layer4.conv2": (LayerGeometry("conv2d", (512, 512, 3, 3), padding=(1, 1)), 9),
    "layer4.conv3": (LayerGeometry("conv2d", (2048, 512, 1, 1)), 4),
    "fc6": (LayerGeometry("linear", (1024, 12544)), 16),
}
DEFAULT_CASES = [c for c in CASES if c != "fc6"]


def make_problem(geometry: LayerGeometry, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, H): Kaiming-normal weight; ``H`` of post-ReLU correlated input rows, float64."""
    gen = torch.Generator().manual_seed(seed)
    length = geometry.row_length
    weight = torch.randn(geometry.weight_shape, generator=gen) * math.sqrt(2.0 / length)
    rank = 64
    latent = torch.randn(rows, rank, generator=gen)
    mix = torch.randn(rank, length, generator=gen) / math.sqrt(rank)
    x = torch.relu(latent @ mix + 0.5 * torch.randn(rows, length, generator=gen) + 0.2)
    h = (x.T @ x).double() / rows
    h += 1e-3 * float(h.diagonal().mean()) * torch.eye(length, dtype=torch.float64)
    return weight.contiguous(), h


@dataclass
class Result:
    case: str
    shape: tuple
    block_size: int
    n_centroids: int
    n_iter: int
    paper_s: float
    hessian_s: float
    ratio: float
    paper_objective: float      # relative output error under H
    hessian_objective: float
    rounds_done: int

    def summary(self) -> str:
        return (f"hessian_speed case={self.case} shape={self.shape} d={self.block_size} K={self.n_centroids} "
                f"iters={self.n_iter} paper={self.paper_s:.1f} s hessian={self.hessian_s:.1f} s "
                f"ratio={self.ratio:.2f}x objective paper={self.paper_objective:.4f} "
                f"hessian={self.hessian_objective:.4f} rounds={self.rounds_done} "
                f"target<={TARGET_RATIO}x {'ok' if self.ratio <= TARGET_RATIO else 'MISSED'}")


def run_case(name: str, args: argparse.Namespace) -> Result:
    geometry, d = CASES[name]
    weight, h = make_problem(geometry, args.rows, args.seed)
    k = clamp_n_centroids(args.n_centroids, geometry.n_subvectors(d))
    t = time.thread_time()
    paper = fit_codebook(weight, geometry, pooled_metric(h, d).float(), k, d, args.n_iter, seed=args.seed, name=name)
    paper_s = time.thread_time() - t
    t = time.thread_time()
    hess = fit_codebook_hessian(weight, geometry, h, k, d, args.n_iter, seed=args.seed, name=name,
                                rounds=args.rounds, stall=args.stall)
    hessian_s = time.thread_time() - t
    del paper
    return Result(name, tuple(geometry.weight_shape), d, k, args.n_iter, paper_s, hessian_s, hessian_s / paper_s,
                  hess.objective[0], hess.objective[-1], len(hess.objective) - 2)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="hessian vs paper fit time per layer (one thread).")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT_CASES)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--n-centroids", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--stall", type=float, default=1e-3, help="early-stop share (0: off)")
    p.add_argument("--rows", type=int, default=2048, help="input rows behind H")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> list[Result]:
    torch.set_num_threads(1)
    out = []
    for name in args.cases:
        res = run_case(name, args)
        print(res.summary(), flush=True)
        out.append(res)
    if out:
        print(f"hessian_speed worst ratio {max(r.ratio for r in out):.2f}x over {len(out)} layers "
              f"(target <= {TARGET_RATIO}x)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in out], indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(get_args_parser().parse_args())
