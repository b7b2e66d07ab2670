"""Do channel permutations (``quantize.permute``) lower the quantization error of the layers they touch?

For every permutable group of a trained teacher whose consumers the pipeline quantizes with
subvectors spanning several input channels: the permutation a run would choose (input scales from
the calibration images' full input statistics ``H``), then each such consumer fitted with the
plan's (d, K) on the identity and on the permuted weight (``paper`` and ``hessian`` objectives,
``H`` permuted alike), scored by the relative layer-output error on held-out inputs
(``Σ||Wx - Ŵx||² / Σ||Wx||²``); and the ``weights`` objective with its own permutation (no
input scales), scored by the k-means' relative weight error. Layers are fitted independently on
the teacher's inputs.

    python -m benchmarks.permute                                  # digits and shapes, pipeline rules
    python -m benchmarks.permute --model shapes --set quantize.rules.4.block_size=18
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bgd_dist.adapters import make_adapter, plan_for
from bgd_dist.core.hessian import pooled_metric, relative_output_error
from bgd_dist.messages import FitJob, FitSettings
from bgd_dist.nn.modules import get_submodule
from bgd_dist.permute import choose_permutation, plan_groups
from bgd_dist.worker import run_fit

from .objective import collect, model_config


def input_index(perm: torch.Tensor, geometry) -> torch.Tensor:
    """A channel permutation as a permutation of the layer's input row (conv2d: channel-major taps)."""
    taps = geometry.weight_shape[2] * geometry.weight_shape[3] if geometry.kind == "conv2d" else 1
    return (perm.view(-1, 1) * taps + torch.arange(taps)).reshape(-1)


def permute_input(weight: torch.Tensor, perm: torch.Tensor, kind: str) -> torch.Tensor:
    return weight[perm] if kind == "conv_transpose2d" else weight[:, perm]


def channel_scale(h: torch.Tensor, geometry) -> torch.Tensor:
    taps = geometry.weight_shape[2] * geometry.weight_shape[3] if geometry.kind == "conv2d" else 1
    return h.diagonal().view(-1, taps).mean(1).clamp_min(0).sqrt()


def benchmark(which: str, overrides: list[str]) -> list[dict]:
    cfg = model_config(which, overrides)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model().eval()
    plan = plan_for(cfg, teacher, adapter)
    q = cfg.quantize
    kept, _ = plan_groups(teacher, plan, adapter.trace)
    layers = [plan.layer(n) for _, sens in kept for n, _ in sens]
    fit_stats = collect(teacher, adapter, layers,
                        adapter.calibration_batches(0, 1, q.n_calibration, q.batch_size, q.seed), adapter.forward)
    held_stats = collect(teacher, adapter, layers, adapter.eval_batches(0, 1, cfg.eval.max_images),
                         lambda m, b: adapter.predict(m, b))
    rows = []
    print(f"{which}: {len(kept)} groups with {len(layers)} sensitive consumers", flush=True)
    for group, sens in kept:
        weights = [(get_submodule(teacher, n).weight.detach(), plan.layer(n).geometry.kind, k) for n, k in sens]
        scales = [channel_scale(fit_stats[n].metric(), plan.layer(n).geometry) for n, _ in sens]
        choice = choose_permutation(weights, scales)
        perm = torch.tensor(choice.perm)
        plain = choose_permutation(weights, [None] * len(sens))   # the weights objective's permutation
        for name, _ in sens:
            l = plan.layer(name)
            w = get_submodule(teacher, name).weight.detach()
            idx = input_index(perm, l.geometry)
            row = {"layer": name, "d": l.block_size, "K": l.n_centroids, "channels": group.channels,
                   "proxy_before": choice.proxy_before, "proxy_after": choice.proxy_after,
                   "search_seconds": choice.seconds}
            for label, weight, index in (("identity", w, None), ("permuted", permute_input(w, perm, l.geometry.kind),
                                                                 idx)):
                h_fit, h_held = fit_stats[name].metric(), held_stats[name].metric()
                if index is not None:
                    h_fit, h_held = h_fit[index][:, index], h_held[index][:, index]
                for objective in ("paper", "hessian"):
                    metric = h_fit if objective == "hessian" else pooled_metric(h_fit, l.block_size)
                    cb = run_fit(FitJob(name, weight, l.geometry, metric, l.n_centroids, l.block_size,
                                        q.seed + l.order, objective, FitSettings.of(q))).codebook
                    decoded = cb.decode(l.geometry, name).half().float()
                    row[f"{objective}_{label}"] = relative_output_error(weight, decoded, l.geometry, h_held)
            for label, weight in (("identity", w), ("permuted", permute_input(w, torch.tensor(plain.perm),
                                                                              l.geometry.kind))):
                cb = run_fit(FitJob(name, weight, l.geometry, None, l.n_centroids, l.block_size, q.seed + l.order,
                                    "weights", FitSettings.of(q))).codebook
                row[f"weights_{label}"] = cb.objective[-1]   # relative weight error of the k-means
            rows.append(row)
            print(f"  {name:45s} C={group.channels:4d} d={l.block_size:2d} K={l.n_centroids:4d} proxy "
                  f"{choice.proxy_before:10.1f} -> {choice.proxy_after:10.1f} ({choice.seconds:.2f} s) | paper "
                  f"{row['paper_identity']:.4f} -> {row['paper_permuted']:.4f} | hessian {row['hessian_identity']:.4f}"
                  f" -> {row['hessian_permuted']:.4f} | weights {row['weights_identity']:.4f} -> "
                  f"{row['weights_permuted']:.4f} (proxy {plain.proxy_before:.1f} -> {plain.proxy_after:.1f})",
                  flush=True)
    for objective in ("weights", "paper", "hessian"):
        if rows:
            a = sum(r[f"{objective}_identity"] for r in rows) / len(rows)
            b = sum(r[f"{objective}_permuted"] for r in rows) / len(rows)
            lower = sum(r[f"{objective}_permuted"] < r[f"{objective}_identity"] for r in rows)
            print(f"  {objective}: mean relative error {a:.4f} -> {b:.4f} ({100 * (b - a) / a:+.1f}%), "
                  f"lower on {lower}/{len(rows)} layers", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["digits", "shapes", "both"], default="both")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    args = p.parse_args(argv)
    t = time.perf_counter()
    out = {m: benchmark(m, args.set) for m in (["digits", "shapes"] if args.model == "both" else [args.model])}
    print(f"total {time.perf_counter() - t:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
