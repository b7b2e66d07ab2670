"""Resilience of distillation on the digits pipeline (shortened), with the figures printed:

(a) ``bgd quantize`` SIGKILLed right after a checkpoint of the global phase, and of the
    layer-wise phase of stage 1, then ``--resume``: is ``model.bgd`` byte-identical to an
    uninterrupted run?
(b) one Ray actor SIGKILLed mid-phase (layer-wise and global): the run finishes by itself;
    bytes compared, steps redone against the checkpoint interval;
(c) checkpoint overhead: distillation time with a checkpoint every N steps against one
    piece per phase (no intermediate checkpoint), and the share spent writing checkpoints;
(d) the size and write time of one ResNet-50 global-phase checkpoint (``--resnet50-only``: just that).

    python -m benchmarks.resilience [--work runs/resilience] [--every 20] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "pipelines/digits.yaml"
SHORT = ["quantize.n_iter=10", "quantize.n_calibration=128", "finetune.layerwise.iterations=20",
         "finetune.global.epochs=1", "finetune.global.iterations_per_epoch=40",
         "executor.kind=ray", "executor.num_workers=2"]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]


def cli(overrides: list[str], out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    env.pop("BGD_TEST_KILL_AT", None)
    if kill_at:
        env["BGD_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "bgd_dist.cli", "quantize", PIPELINE, "--out", str(out), "--no-eval",
           "--no-progress", *[a for o in overrides for a in ("--set", o)], *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)


def same_bytes(a: Path, b: Path) -> bool:
    return (a / "model.bgd").read_bytes() == (b / "model.bgd").read_bytes()


def phase_seconds(run_dir: Path) -> tuple[float, float, float, int]:
    ends = [e for e in events(run_dir) if e["event"] == "phase_end"]
    n_ckpt = sum(1 for e in events(run_dir) if e["event"] == "loss")
    return (sum(e["seconds"] for e in ends), sum(e["checkpoint_seconds"] for e in ends),
            sum(e["plot_seconds"] for e in ends), n_ckpt)


def resnet50_checkpoint_cost(work: Path, workers: int = 8, repeats: int = 5) -> None:
    """(d) What one checkpoint of a ResNet-50 global phase (resnet50_small plan, ``workers`` BN buffer
    sets) weighs and takes to write here, against the default interval at the README's 8-GPU step time."""
    import torch

    from bgd_dist.adapters import build_architecture, make_adapter, plan_for
    from bgd_dist.config import load_pipeline
    from bgd_dist.finetune import PhaseSpec, PhaseState
    from bgd_dist.phases import save_checkpoint

    cfg = load_pipeline(str(ROOT / "pipelines/resnet50_small.yaml"))
    model = build_architecture(make_adapter(cfg.model, cfg.data).arch())
    plan = plan_for(cfg, model, make_adapter(cfg.model, cfg.data))
    centroids = {l.name: torch.randn(l.n_centroids, l.block_size) for l in plan.quantized}
    momentum = {"state": {i: {"momentum_buffer": torch.randn_like(c)} for i, c in enumerate(centroids.values())},
                "param_groups": [{"lr": 0.01, "params": list(range(len(centroids)))}]}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    state = PhaseState(1000, centroids, momentum, [buffers] * workers, [0.5] * 1000)
    spec = PhaseSpec("global", 90000, 0.01, 0.9, 1e-4, 128, train_mode=True)
    path = work / "r50" / "distill.pt"
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        save_checkpoint(path, spec, state, "x")
        times.append(time.perf_counter() - t)
    every = cfg.finetune.checkpoint_every
    best = min(times)
    print(f"(d) a ResNet-50 global-phase checkpoint ({len(centroids)} layers, {workers} workers' BN buffers): "
          f"{path.stat().st_size / 2**20:.2f} MB, written in {1000 * best:.0f} ms (best of {repeats}); every "
          f"{every} steps at ~25 ms a step (8 GPUs) that is {100 * best / (every * 0.025):.2f} % of the phase",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/resilience")
    p.add_argument("--every", type=int, default=10, help="finetune.checkpoint_every")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resnet50-only", action="store_true", help="only (d), the ResNet-50 checkpoint cost")
    p.add_argument("--overhead-only", action="store_true", help="only (c) and (d)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.resnet50_only:
        resnet50_checkpoint_cost((ROOT / args.work).resolve())
        return
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():   # earlier results go; the trained teacher (cache/) stays
        if old.name != "cache":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    overrides = [*SHORT, f"data.cache_dir={work / 'cache'}", f"finetune.checkpoint_every={args.every}",
                 *args.overrides]

    import ray

    from bgd_dist.adapters import make_adapter
    from bgd_dist.config import load_pipeline
    from bgd_dist.distributed.ray_executor import RayExecutor
    from bgd_dist.runner import run

    cfg = load_pipeline(str(ROOT / PIPELINE), overrides)
    make_adapter(cfg.model, cfg.data).build_model()   # train and cache the teacher once, outside the timings
    lw_total = cfg.finetune.layerwise.iterations
    gl_total = cfg.finetune.global_.epochs * cfg.finetune.global_.iterations_per_epoch
    every = args.every
    resnet50_checkpoint_cost(work)
    print(f"digits, shortened: layer-wise {lw_total} steps per stage, global {gl_total} steps, "
          f"checkpoint every {every} steps, Ray executor with 2 workers", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the reference, and (c): the same run with one piece per phase
        ref = work / "reference"
        with RayExecutor(num_workers=2) as ex:
            run(cfg, ref, ex, do_eval=False, progress=False)
        one = work / "one_piece"
        cfg_one = load_pipeline(str(ROOT / PIPELINE), overrides + ["finetune.checkpoint_every=1000000000"])
        with RayExecutor(num_workers=2) as ex:
            run(cfg_one, one, ex, do_eval=False, progress=False)
        t_ck, t_write, t_plot, n_ck = phase_seconds(ref)
        t_one, _, _, n_one = phase_seconds(one)
        print(f"(c) distillation {t_ck:.1f} s with {n_ck} checkpoints vs {t_one:.1f} s with {n_one} (one piece per "
              f"phase): overhead {100 * (t_ck - t_one) / t_one:+.1f} %; writing the checkpoints {t_write:.2f} s "
              f"= {100 * t_write / t_ck:.2f} % of the phases ({1000 * t_write / n_ck:.1f} ms each), losses.png "
              f"{t_plot:.2f} s; same bytes as the reference: {same_bytes(ref, one)}", flush=True)
        # (b) one actor SIGKILLed mid-phase; the run recovers by itself
        for phase, at in [] if args.overhead_only else (("layerwise", every + every // 2), ("global", every * 2 + every // 2)):
            out = work / f"actor_{phase}"
            t = time.perf_counter()
            with RayExecutor(num_workers=2) as ex:
                ex.kill_actor_at = (phase, at, 1)
                run(cfg, out, ex, do_eval=False, progress=False)
            restarts = [e for e in events(out) if e["event"] == "restart"]
            r = restarts[0]
            print(f"(b) actor 1 SIGKILLed at {phase} step {at}: run finished by itself in "
                  f"{time.perf_counter() - t:.1f} s, {len(restarts)} restart, resumed from the checkpoint at "
                  f"step {r['from_step']}, {r['steps_redone']} steps redone (checkpoint interval {every}); "
                  f"model.bgd identical to the reference: {same_bytes(ref, out)}", flush=True)
    finally:
        ray.shutdown()
    # (a) the driver SIGKILLed right after a checkpoint, then --resume
    for kill_at in [] if args.overhead_only else (f"global:{every * 3}", f"layerwise:1:{every}"):
        out = work / ("killed_" + kill_at.split(":")[0])
        t = time.perf_counter()
        first = cli(overrides, out, kill_at=kill_at)
        killed = first.returncode == -signal.SIGKILL
        second = cli(overrides, out, "--resume")
        if second.returncode != 0:
            print(second.stderr[-3000:])
        starts = [e for e in events(out) if e["event"] == "phase_start" and e["start_step"] > 0]
        print(f"(a) bgd quantize SIGKILLed after the checkpoint at {kill_at} (rc {first.returncode}, killed: "
              f"{killed}); --resume continued the {starts[0]['phase'] if starts else '?'} phase at step "
              f"{starts[0]['start_step'] if starts else '?'} (rc {second.returncode}, {time.perf_counter() - t:.1f} s "
              f"for both); model.bgd identical to the uninterrupted run: {same_bytes(ref, out)}", flush=True)


if __name__ == "__main__":
    main()
