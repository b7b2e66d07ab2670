"""Decode speed of a ResNet-50 "small" compressed file (METHOD.md §5 configuration).

Builds a torchvision ResNet-50 (weights=None), quantizes it with random
codebooks under the paper's small-blocks rules (conv1 skipped; 3x3 d=9; 1x1
d=4; fc d=4 K=1024; K=256 elsewhere), writes ``model.bgd`` to a temporary
directory and times :func:`bgd_dist.fileformat.load_compressed` (median of
``--repeats``). Prints one summary line.

    python benchmarks/decode_speed.py [--repeats 3] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from bgd_dist.core.kmeans import Codebook
from bgd_dist.core.sizing import MB, size_report
from bgd_dist.fileformat import load_compressed, save_compressed
from bgd_dist.nn.modules import quantize_
from bgd_dist.plan import Rule, build_plan

RULES = [
    Rule("conv1", skip=True),
    Rule("fc", block_size=4, n_centroids=1024),
    Rule(r".*", kind="conv2d", kernel=(3, 3), block_size=9),
    Rule(r".*", kind="conv2d", kernel=(1, 1), block_size=4),
]


def random_compressed_resnet50(seed: int = 0):
    """(quantized model, plan) with random centroids (K, d) and random assignments."""
    gen = torch.Generator().manual_seed(seed)
    model = torchvision.models.resnet50(weights=None).eval()
    plan = build_plan(model, RULES, run=lambda m: m(torch.zeros(1, 3, 64, 64)))
    codebooks = {
        l.name: Codebook(0.05 * torch.randn(l.n_centroids, l.block_size, generator=gen),
                         torch.randint(l.n_centroids, (l.n_subvectors,), generator=gen), ())
        for l in plan.quantized
    }
    return quantize_(model, plan, codebooks), plan


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="directory for model.bgd (default: a temporary one)")
    return p


def main(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, plan = random_compressed_resnet50()
    accounted = size_report(model, plan).compressed_bytes
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.out or Path(tmp)) / "model.bgd"
        on_disk = save_compressed(path, model, plan,
                                  {"factory": "torchvision.models:resnet50", "kwargs": {"num_classes": 1000}})
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_compressed(path)
            times.append(time.perf_counter() - start)
    line = (f"resnet50 small: on-disk {on_disk / MB:.3f} MB ({on_disk:,} B), accounted {accounted / MB:.3f} MB "
            f"(disk/accounted {on_disk / accounted:.4f}), load_compressed median of {args.repeats}: "
            f"{statistics.median(times):.3f} s ({torch.get_num_threads()} threads)")
    print(line)
    return line


if __name__ == "__main__":
    main(get_args_parser().parse_args())
