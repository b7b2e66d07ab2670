"""``quantize.target_mb`` on the digits model: does the allocation hit the size, and beat the rules?

1. The size S of the hand-written rules of pipelines/digits.yaml (the paper's
   allocation: 3x3 d=9, 1x1 and fc d=4, K=256 clamped).
2. The candidates of every layer and their predicted errors (one statistics
   pass on the teacher, one short fit per candidate), computed once; then the
   allocation for S, 0.75 S and 1.25 S with both methods (greedy, exact):
   achieved size vs target ("saturated" when every layer already has its
   lowest-error candidate and the budget cannot be spent).
3. At size S: the rules vs the allocations, each layer fitted with the full
   k-means (paper / hessian objective) on the teacher's calibration inputs and
   scored on held-out inputs (relative layer-output error, size-weighted mean
   and mean over layers; benchmarks/objective.py), and the held-out top-1 of a
   run without fine-tuning (the runner allocates by itself from target_mb).

    python -m benchmarks.budget
    python -m benchmarks.budget --no-runs      # skip the top-1 runs
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from bgd_dist.adapters import make_adapter, plan_for
from bgd_dist.allocation import allocation_options, choose
from bgd_dist.config import load_pipeline
from bgd_dist.core.sizing import size_report
from bgd_dist.executor import SerialExecutor

from benchmarks.objective import collect, fit_all, summary

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "digits.yaml"
NO_FT = ["finetune.layerwise.enabled=false", "finetune.global.enabled=false", "executor.kind=serial"]
METHODS = ("greedy", "exact")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-runs", action="store_true", help="skip the top-1 runs")
    p.add_argument("--out", default="runs/bench_budget")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline(PIPELINE, ["executor.kind=serial"])
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model().eval()
    rules_plan = plan_for(cfg, teacher, adapter)
    s_mb = size_report(teacher, rules_plan).compressed_mb
    t = time.perf_counter()
    with SerialExecutor(num_shards=1) as ex:
        ex.start(cfg.model, cfg.data)
        options, _ = allocation_options(cfg, teacher, rules_plan, ex, progress=False)
    options_seconds = time.perf_counter() - t
    n_options = sum(len(o) for o in options.values())
    print(f"digits: rules size S = {s_mb:.5f} MB; {n_options} candidates over {len(options)} layers scored in "
          f"{options_seconds:.1f} s")
    sizes = []
    plans = {"rules": rules_plan}
    for factor in (1.0, 0.75, 1.25):
        for method in METHODS:
            target = s_mb * factor
            plan, chosen, _ = choose(cfg, teacher, rules_plan, options, target, method)
            achieved = size_report(teacher, plan).compressed_mb
            saturated = all(chosen.choices[n].error == min(o.error for o in opts) for n, opts in options.items())
            sizes.append({"target_mb": target, "method": method, "achieved_mb": achieved,
                          "share": achieved / target, "predicted_error": chosen.total_error,
                          "saturated": saturated})
            if factor == 1.0:
                plans[f"target_mb, {method}"] = plan
    print(f"\n| {'target MB':>10} | {'method':<6} | {'achieved MB':>11} | {'of target':>9} | {'pred. error':>11} |")
    print(f"|{'-' * 12}|{'-' * 8}|{'-' * 13}|{'-' * 11}|{'-' * 13}|")
    for r in sizes:
        ok = "ok" if 0.99 <= r["share"] <= 1.0 else "saturated" if r["saturated"] else "MISSED"
        print(f"| {r['target_mb']:>10.5f} | {r['method']:<6} | {r['achieved_mb']:>11.5f} | {r['share']:>8.2%} "
              f"| {r['predicted_error']:>11.4f} | {ok}")
    # held-out layer-output errors of full fits at size S
    q = cfg.quantize
    quantized = rules_plan.quantized
    fit_stats = collect(teacher, adapter, quantized,
                        adapter.calibration_batches(0, 1, q.n_calibration, q.batch_size, q.seed), adapter.forward)
    held_stats = collect(teacher, adapter, quantized, adapter.eval_batches(0, 1, cfg.eval.max_images),
                         lambda m, b: adapter.predict(m, b))
    errors = {}
    for label, plan in plans.items():
        rows = fit_all(teacher, plan, cfg, fit_stats, held_stats, log_each=False)
        s = summary(rows, fit_stats)
        errors[label] = {"size_mb": size_report(teacher, plan).compressed_mb,
                         "size_weighted": s["size_weighted_error"],
                         "mean": {o: sum(r[o] for r in rows) / len(rows) for o in ("paper", "hessian")},
                         "allocation": [(r["layer"], r["d"], r["K"]) for r in rows]}
    top1 = {}
    if not args.no_runs:
        from bgd_dist.runner import run

        for label, extra in [("rules", []), *[(f"target_mb, {m}", [f"quantize.target_mb={s_mb}",
                                                                    f"quantize.allocation.method={m}"])
                                              for m in METHODS]]:
            for objective in ("paper", "hessian"):
                out = Path(args.out) / f"{label.replace(', ', '_')}_{objective}"
                if out.exists():
                    shutil.rmtree(out)
                rcfg = load_pipeline(PIPELINE, [*NO_FT, *extra, f"quantize.objective={objective}"])
                report = run(rcfg, out, progress=False)
                top1[(label, objective)] = report["metrics_after"]["top1"]
                errors[label].setdefault("run_size_mb", report["compressed_mb"])
    print(f"\nat S = {s_mb:.5f} MB (no fine-tuning; held-out relative layer-output error of per-layer fits "
          f"on the teacher, size-weighted | mean over layers; top-1 of a run):")
    print(f"| {'allocation':<18} | {'size MB':>8} | {'paper err':>15} | {'hessian err':>15} | "
          f"{'top-1 paper':>11} | {'top-1 hessian':>13} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 17}|{'-' * 17}|{'-' * 13}|{'-' * 15}|")
    for label, e in errors.items():
        t_p = top1.get((label, "paper"))
        t_h = top1.get((label, "hessian"))
        print(f"| {label:<18} | {e['size_mb']:>8.5f} | {e['size_weighted']['paper']:>6.4f} | "
              f"{e['mean']['paper']:>6.4f} | {e['size_weighted']['hessian']:>6.4f} | {e['mean']['hessian']:>6.4f} | "
              f"{'-' if t_p is None else f'{t_p:.2f}':>11} | {'-' if t_h is None else f'{t_h:.2f}':>13} |")
    for label, e in errors.items():
        if label != "rules":
            print(f"{label}: " + ", ".join(f"{n} d={d} K={k}" for n, d, k in e["allocation"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {"rules_mb": s_mb, "sizes": sizes, "errors": errors,
              "top1": {f"{a} / {b}": v for (a, b), v in top1.items()}, "options_seconds": options_seconds}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
