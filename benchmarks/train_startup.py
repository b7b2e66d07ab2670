"""Start-up cost of Ray Train (TorchTrainer, V2) against the executor's actor group.

Measures, on a local Ray cluster that is already up, the seconds from "start a
data-parallel distillation with N CPU workers" to "the first SGD step is done":

- actor group: the ``RayExecutor``'s actors (model replicas), the gloo group,
  the student shipped, one step (what a run pays once; a phase start after that
  costs one call);
- TorchTrainer: ``TorchTrainer(...).fit()`` with ``ScalingConfig(num_workers=N)``,
  whose workers build the same model and student and take the same step (what
  every phase would pay if it were run as a trainer: Train starts its worker
  group per ``fit``).

    python -m benchmarks.train_startup [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402

import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _setup():
    import copy

    from bgd_dist.adapters import make_adapter, plan_for
    from bgd_dist.core.kmeans import fit_codebook
    from bgd_dist.finetune import global_spec
    from bgd_dist.nn.modules import get_submodule, quantize_
    from bgd_dist.student import student_state
    from toy import toy_config

    cfg = toy_config()
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    plan = plan_for(cfg, teacher, adapter)
    student = copy.deepcopy(teacher)
    cbs = {l.name: fit_codebook(get_submodule(student, l.name).weight.detach(), l.geometry, None, l.n_centroids,
                                l.block_size, 4) for l in plan.quantized}
    quantize_(student, plan, cbs)
    return cfg, student_state(student), global_spec(cfg.finetune.global_, seed=1)


def actor_group(cfg, payload, spec, workers: int) -> float:
    from bgd_dist.distributed.ray_executor import RayExecutor

    t = time.perf_counter()
    ex = RayExecutor(num_workers=workers)
    try:
        ex.start(cfg.model, cfg.data)
        ex.load_student(payload)
        ex.distill(spec, None, 1)
        return time.perf_counter() - t
    finally:
        ex.close()


def _train_loop(config):
    import ray.train
    import torch.distributed as dist

    from bgd_dist.worker import Worker

    w = Worker(config["model"], config["data"], threads=1)
    w.load_student(ray.get(config["payload"]))
    ctx = ray.train.get_context()
    w.rank, w.world = ctx.get_world_rank(), ctx.get_world_size()
    assert dist.is_initialized()
    w.distill(config["spec"], w.rank, w.world, None, 1)
    if w.rank == 0:   # one machine: the driver reads the time from this file
        with open(config["stamp"], "w") as f:
            f.write(repr(time.time()))


def torch_trainer(cfg, payload, spec, workers: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ref = ray.put(payload)
    with tempfile.TemporaryDirectory() as storage:
        t = time.perf_counter()
        t_wall = time.time()
        trainer = TorchTrainer(_train_loop, train_loop_config={"model": cfg.model, "data": cfg.data,
                                                               "payload": ref, "spec": spec,
                                                               "stamp": os.path.join(storage, "first_step")},
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                                            resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(storage_path=storage, name="startup"))
        trainer.fit()
        with open(os.path.join(storage, "first_step")) as f:
            first = float(f.read()) - t_wall
    return first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, payload, spec = _setup()
    ray.init(address="local", num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    try:
        rows = []
        for r in range(args.repeats):
            a = actor_group(cfg, payload, spec, args.workers)
            b = torch_trainer(cfg, payload, spec, args.workers)
            rows.append((a, b))
            print(f"repeat {r}: actor group {a:.2f} s, TorchTrainer {b:.2f} s to the first step", flush=True)
        a = min(x for x, _ in rows)
        b = min(y for _, y in rows)
        print(f"time to the first distillation step with {args.workers} CPU workers (best of {args.repeats}): "
              f"actor group {a:.2f} s, TorchTrainer {b:.2f} s ({b / a:.1f}x)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
