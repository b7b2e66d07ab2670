"""The real-data table of the README: scikit-learn's digits, compressed with the paper's method.

Rows (same teacher, same seed, same size by the paper's accounting):

- teacher: the uncompressed network (trained and cached by the adapter);
- weights-only PQ: classic product quantization (identity metric), no fine-tuning;
- activation-aware: the paper's objective (pooled input Gram metric), no fine-tuning;
- weights-only PQ + fine-tuning: the baseline given the same distillation (ablation);
- full pipeline: activation-aware + layer-wise + global distillation (the paper's method).

Columns: size (MB, paper's accounting) and ratio, held-out top-1 (400 images),
and the layer-output error: the mean over quantized layers of
``||W x - Ŵ x||² / ||W x||²`` with ``x`` the layer's inputs in the teacher on
the held-out images (what the paper's objective minimises; fine-tuning trades
it for the network's output).

    python benchmarks/digits.py                      # Ray, 2 workers, pipelines/digits.yaml as written
    python benchmarks/digits.py --executor serial --set finetune.layerwise.iterations=50
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from bgd_dist import load_compressed
from bgd_dist.adapters import make_adapter
from bgd_dist.config import load_pipeline
from bgd_dist.runner import run
from classification.diagnostics import layer_output_errors, relative_output_error

ROOT = Path(__file__).resolve().parents[1]
NO_FINETUNE = ["finetune.layerwise.enabled=false", "finetune.global.enabled=false"]
VARIANTS = [
    ("weights-only PQ", ["quantize.objective=weights", *NO_FINETUNE]),
    ("activation-aware (no fine-tuning)", ["quantize.objective=paper", *NO_FINETUNE]),
    ("weights-only PQ + fine-tuning", ["quantize.objective=weights"]),
    ("full pipeline (activation-aware + fine-tuning)", ["quantize.objective=paper"]),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=str(ROOT / "pipelines" / "digits.yaml"))
    p.add_argument("--out", default="runs/bench_digits", help="run directories (one per row)")
    p.add_argument("--executor", choices=["ray", "serial"], help="override executor.kind")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
    cfg = load_pipeline(args.pipeline, base)
    started_ray = False
    if cfg.executor.kind == "ray" and not cfg.executor.address:
        import ray

        if not ray.is_initialized():  # one local cluster for every row
            ray.init(num_cpus=cfg.executor.num_cpus or cfg.executor.num_workers, include_dashboard=False,
                     log_to_driver=False)
            started_ray = True
    adapter = make_adapter(cfg.model, cfg.data)
    t = time.perf_counter()
    teacher = adapter.build_model()
    teacher_seconds = time.perf_counter() - t
    images, _ = adapter.heldout()
    rows = []
    try:
        for label, overrides in VARIANTS:
            vcfg = load_pipeline(args.pipeline, base + overrides)
            out = Path(args.out) / label.split(" (")[0].replace(" ", "_").replace("+", "ft").replace("-", "_")
            if (out / "manifest.json").exists():  # a previous benchmark's run directory
                shutil.rmtree(out)
            report = run(vcfg, out, progress=False)
            if not rows:
                rows.append({"model": "teacher", "size_mb": report["uncompressed_mb"], "ratio": 1.0,
                             "top1": report["metrics_before"]["top1"], "output_error": 0.0,
                             "seconds": teacher_seconds})
                print(format_table(rows), flush=True)
            errors = layer_output_errors(teacher, load_compressed(out / "model.bgd"), images)
            rows.append({"model": label, "size_mb": report["compressed_mb"], "ratio": report["ratio"],
                         "top1": report["metrics_after"]["top1"], "output_error": relative_output_error(errors),
                         "seconds": report["seconds"]["total"]})
            print(format_row(rows[-1]), flush=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print()
    print(f"digits ({cfg.name}): {len(images)} held-out images, executor {cfg.executor.kind} x "
          f"{cfg.executor.num_workers}, torch {torch.__version__}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def format_row(r: dict) -> str:
    return (f"| {r['model']:<47} | {r['size_mb']:>8.4f} | {r['ratio']:>6.1f}x | {r['top1']:>6.2f} | "
            f"{r['output_error']:>14.4f} | {r['seconds']:>6.0f} |")


def format_table(rows: list[dict]) -> str:
    head = (f"| {'model':<47} | {'size MB':>8} | {'ratio':>7} | {'top-1':>6} | {'layer out. err':>14} | "
            f"{'time s':>6} |")
    rule = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    return "\n".join([head, rule, *(format_row(r) for r in rows)])


if __name__ == "__main__":
    main()
