"""Ray executor vs in-process executor on one machine, and what moves per stage.

Runs the same pipeline (quantization + distillation, no evaluation) twice:
``RayExecutor`` with N workers x 1 thread, and ``SerialExecutor`` with N
threads, and prints the wall-time ratio. Then runs the Ray executor with the
calibration set at 1x and 4x images and prints the bytes put into the object
store per stage (the student's state) and the statistics returned: neither may
grow with the number of images, since workers never return activations.

    python benchmarks/distributed.py [--pipeline pipelines/X.yaml] [--set key=value ...]
    python benchmarks/distributed.py --demo [--quick]     # the embedded demo pipeline (Mask R-CNN, shapes)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

from pathlib import Path

import ray
import torch

from bgd_dist.config import load_pipeline
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.executor import SerialExecutor
from bgd_dist.runner import run

DEFAULT_PIPELINE = "pipelines/digits.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--demo", action="store_true", help="the demo pipeline (shapes Mask R-CNN) instead of --pipeline")
    p.add_argument("--quick", action="store_true", help="with --demo: the demo's shortened configuration")
    p.add_argument("--json", help="write the figures to this file")
    return p


def timed_run(cfg, executor) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = run(cfg, out, executor, do_eval=False, progress=False)
        return time.perf_counter() - start, report


def main(args) -> dict:
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"executor.num_workers={args.workers}", *args.overrides]
    if args.demo:
        from detection.demo import demo_config

        args.pipeline = "demo" + (" (quick)" if args.quick else "")

        def load(extra):
            return demo_config(Path("runs/bench_demo"), args.quick, "ray", extra)
    else:
        def load(extra):
            return load_pipeline(args.pipeline, extra)
    cfg = load(overrides)
    n_images = cfg.quantize.n_calibration

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        ray_ex = RayExecutor(num_workers=args.workers, threads_per_worker=1)
        ray_s, ray_report = timed_run(cfg, ray_ex)
        ray_ex.close()
        threads = torch.get_num_threads()
        serial_s, _ = timed_run(cfg, SerialExecutor(num_shards=args.workers, threads=args.workers))
        torch.set_num_threads(threads)
        cfg4 = load(overrides + [f"quantize.n_calibration={4 * n_images}"])
        ray_ex = RayExecutor(num_workers=args.workers, threads_per_worker=1)
        _, ray4_report = timed_run(cfg4, ray_ex)
        ray_ex.close()
    finally:
        ray.shutdown()

    put1 = [s["bytes_shipped"] for s in ray_report["stages"]]
    put4 = [s["bytes_shipped"] for s in ray4_report["stages"]]
    ret1 = [s["stats_bytes_returned"] for s in ray_report["stages"]]
    ret4 = [s["stats_bytes_returned"] for s in ray4_report["stages"]]
    ratio = ray_s / serial_s
    figures = {"pipeline": args.pipeline, "workers": args.workers, "ray_seconds": ray_s, "serial_seconds": serial_s,
               "ray_over_serial": ratio, "calibration_images": [n_images, 4 * n_images],
               "bytes_put_per_stage_1x": put1, "bytes_put_per_stage_4x": put4,
               "stats_bytes_per_stage_1x": ret1, "stats_bytes_per_stage_4x": ret4}
    same = put1 == put4 and ret1 == ret4
    print(f"distributed pipeline={args.pipeline} workers={args.workers}: ray {ray_s:.1f} s vs serial "
          f"{serial_s:.1f} s -> ray/serial = {ratio:.2f} (target <= 1.25: {'ok' if ratio <= 1.25 else 'MISSED'})")
    print(f"distributed bytes per stage: put {sum(put1) / len(put1) / 2**20:.2f} MB (1x = {n_images} images) vs "
          f"{sum(put4) / len(put4) / 2**20:.2f} MB (4x), stats returned {sum(ret1) / len(ret1) / 1024:.1f} KiB vs "
          f"{sum(ret4) / len(ret4) / 1024:.1f} KiB -> independent of the number of images: "
          f"{'ok' if same else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
