"""Layer-wise distillation time with the teacher's outputs reused across stages, against the same
run that computes them again (``finetune.layerwise.reuse_teacher: true`` in both: the same batch
stream; ``teacher_cache_mb`` 1024 vs 0).

The digits pipeline, serial executor, one worker, one thread, global phase off, ``--iterations``
layer-wise steps per stage, a short k-means (the fit is not what is measured); the two settings
alternate ``--repeats`` times and the best time of each is compared. Also checks that both runs
trained the same weights.

    python -m benchmarks.teacher_cache [--iterations 150] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    from bgd_dist.config import load_pipeline
    from bgd_dist.executor import SerialExecutor
    from bgd_dist.fileformat import load_compressed
    from bgd_dist.runner import run

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    models, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"data.cache_dir={ROOT / 'runs' / 'cache'}", "executor.kind=serial", "executor.num_workers=1",
                "finetune.global.enabled=false", f"finetune.layerwise.iterations={args.iterations}",
                f"finetune.checkpoint_every={args.iterations}", "quantize.n_iter=5", "quantize.n_calibration=128",
                "finetune.layerwise.reuse_teacher=true"]
        for rep in range(args.repeats):
            for name, extra in (("uncached", ["finetune.layerwise.teacher_cache_mb=0"]), ("cached", [])):
                cfg = load_pipeline(ROOT / "pipelines" / "digits.yaml", base + extra)
                out = Path(tmp) / f"{name}{rep}"
                ex = SerialExecutor(num_shards=1, threads=1)
                ex.start(cfg.model, cfg.data)
                report = run(cfg, out, executor=ex, progress=False, do_eval=False)
                cache = ex.worker.teacher_cache
                counts[name] = (cache.hits, cache.misses) if cache else (0, 0)
                ex.close()
                times[name].append(report["seconds"]["layerwise"])
                models[name] = load_compressed(out / "model.bgd").state_dict()
                print(f"teacher_cache {name} run {rep + 1}: layer-wise {times[name][-1]:.1f} s over "
                      f"{len(report['stages'])} stages, cache hits/misses {counts[name]}", flush=True)
    same = models["cached"].keys() == models["uncached"].keys() and all(
        torch.equal(models["cached"][k], models["uncached"][k]) for k in models["cached"])
    ratio = min(times["cached"]) / min(times["uncached"])
    print(f"teacher_cache layer-wise time cached / uncached (best of {args.repeats}): {ratio:.2f}; "
          f"identical trained weights: {same}")
    return {"times": times, "ratio": ratio, "identical": same, "counts": counts}


if __name__ == "__main__":
    main()
