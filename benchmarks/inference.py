"""Inference speed of a loaded compressed model against the dense torchvision model.

For ResNet-18 and ResNet-50 (torchvision, random weights): the plan of the
paper's pipeline (``pipelines/<arch>_<small|large>.yaml``'s rules), a quick
weights-only quantization (k-means of the weights, ``--n-iter`` iterations, no
data), ``model.bgd`` written and read back with ``load_compressed``. Then, on
one thread, eval mode, no gradients, batch 1 and 8: the loaded model
(decoded weights reused, the default) and, with ``--lean``, the memory-lean
mode (decoding on every call) against the dense torchvision model holding the
same weights. Runs alternate between the models; each figure is the median of
``--repeats`` runs after ``--warmup`` runs, in CPU time of the one thread doing
the work (robust to other jobs on the machine); the ratio is compressed / dense.
Also checks that the outputs are identical.

    python -m benchmarks.inference [--archs resnet18 resnet50] [--batches 1 8] [--repeats 7] [--lean]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import yaml

from bgd_dist.config import QuantizeConfig, from_mapping
from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.fileformat import load_compressed, save_compressed
from bgd_dist.nn.modules import pq_layers, quantize_, set_weight_cache
from bgd_dist.plan import build_plan

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def quick_compressed(arch: str, pipeline: str, n_iter: int, seed: int = 0):
    """(quantized model, plan): ``arch`` with random weights, the pipeline's rules, weights-only k-means."""
    raw = yaml.safe_load((PIPELINES / f"{pipeline}.yaml").read_text())
    q = from_mapping(QuantizeConfig, raw["quantize"], "quantize")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    plan = build_plan(model, q.rules, run=lambda m: m(torch.zeros(1, 3, 64, 64)), default_n_centroids=q.n_centroids,
                      default_objective="weights", clamp=q.clamp)
    codebooks = {}
    for layer in plan.quantized:
        weight = model.get_submodule(layer.name).weight.detach()
        codebooks[layer.name] = fit_codebook(weight, layer.geometry, None, layer.n_centroids, layer.block_size,
                                             n_iter=n_iter, seed=seed, name=layer.name, refine="lloyd")
    return quantize_(model, plan, codebooks), plan


def timed(model, x) -> float:
    """CPU seconds of this thread for one forward (one intra-op thread: the work runs on it); unlike
    wall-clock time, it does not count the time other processes hold the cores."""
    with torch.no_grad():
        start = time.thread_time()
        model(x)
        return time.thread_time() - start


def compare(models: dict, x, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each model, runs interleaved."""
    for _ in range(warmup):
        for m in models.values():
            timed(m, x)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            times[name].append(timed(m, x))
    return {name: statistics.median(t) for name, t in times.items()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--pipeline", choices=["small", "large"], default="small", help="the paper pipeline's plan")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--size", type=int, default=224, help="input side")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-iter", type=int, default=2, help="k-means iterations of the quick quantization")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lean", action="store_true", help="also time the memory-lean mode (decode per call)")
    return p


def main(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    print(f"threads={args.threads}, input {args.size}x{args.size}, median of {args.repeats} runs "
          f"(after {args.warmup}) in thread CPU time, eval mode, no gradients; ratio = compressed / dense")
    for arch in args.archs:
        model, plan = quick_compressed(arch, f"{arch}_{args.pipeline}", args.n_iter)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.bgd"
            save_compressed(path, model, plan, {"factory": f"torchvision.models:{arch}", "kwargs": {}})
            loaded = load_compressed(path)
            dense = getattr(torchvision.models, arch)(weights=None).eval()
            dense.load_state_dict(load_compressed(path, dense=True).state_dict(), strict=True)
        models = {"compressed": loaded, "dense": dense}
        if args.lean:
            import copy

            models["lean"] = set_weight_cache(copy.deepcopy(loaded), False)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                same = all(torch.equal(m(x), dense(x)) for m in models.values())
            t = compare(models, x, args.warmup, args.repeats)
            row = {"arch": arch, "batch": batch, "dense_ms": 1e3 * t["dense"], "compressed_ms": 1e3 * t["compressed"],
                   "ratio": t["compressed"] / t["dense"], "identical_outputs": same}
            line = (f"{arch:<9} batch {batch}: dense {row['dense_ms']:8.1f} ms, compressed {row['compressed_ms']:8.1f} ms,"
                    f" ratio {row['ratio']:.3f}")
            if args.lean:
                row["lean_ratio"] = t["lean"] / t["dense"]
                line += f"; lean (decode per call) ratio {row['lean_ratio']:.3f}"
            print(line + f"; identical outputs: {same}", flush=True)
            rows.append(row)
        layers = list(pq_layers(loaded).values())
        lookups = 200
        start = time.thread_time()
        with torch.no_grad():
            for _ in range(lookups):
                for layer in layers:
                    layer.weight
        overhead = (time.thread_time() - start) / lookups
        first = next(r for r in rows if r["arch"] == arch)
        print(f"{arch:<9} cache lookups: {1e6 * overhead / len(layers):.1f} us per layer, {1e3 * overhead:.2f} ms "
              f"per forward ({len(layers)} layers) = {100 * overhead / (1e-3 * first['dense_ms']):.2f}% of the dense "
              f"forward at batch {first['batch']}", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} ({'<=' if worst <= 1.05 else '>'} 1.05)")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
