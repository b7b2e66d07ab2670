"""Which objective fits a layer best at the same size: weights vs paper vs hessian.

For every layer a pipeline quantizes, on the trained teacher:

1. the layer's full input statistics ``H`` are collected on the calibration
   images (what a run collects) and, separately, on held-out images (the
   evaluation split, through the model's inference path);
2. three codebooks are fitted with the plan's (d, K) (identical size):
   ``weights`` (identity metric, classic PQ), ``paper`` (the pooled d x d Gram,
   which is the mean of H's diagonal blocks) and ``hessian`` (full H, error
   feedback, exact codebook update);
3. each is scored by the relative layer-output error on the held-out inputs,
   ``Σ||Wx - Ŵx||² / Σ||Wx||² = tr(ΔW H' ΔWᵀ) / tr(W H' Wᵀ)``.

Layers are fitted independently on the teacher's inputs (no sequential
student, no fine-tuning), which isolates the fitting objective. Also printed:
the fit time of hessian vs paper (ratio) and the statistics memory.

    python -m benchmarks.objective                  # digits ResNet and the shapes Mask R-CNN (demo data)
    python -m benchmarks.objective --model digits --json runs/objective.json
    python -m benchmarks.objective --end            # also end metrics of every variant (below), no FT / full
    python -m benchmarks.objective --end --skip-layers --model shapes --variants "no fine-tuning" --keep

End metrics (``--end``): the pipeline run as written but for each variant's
settings, serial executor, same seeds, identical size: the paper objective, the
hessian objective, hessian + bias correction, hessian + permutations, all three
(each without fine-tuning and with the full pipeline), all three and hessian +
permutations with BN affine and bias training in both distillation phases (the
latter also with a global phase twice as long), hessian fitted to the teacher's
outputs (``quantize.hessian.target: teacher``; on shapes with the region heads
teacher-forced) alone, with permutations and with the other three ("all four"),
on shapes four of the variants without fine-tuning again with 256 instead of the pipeline's 64
calibration images ("256 calib."), all four with all 400 training images ("400 calib.") and all four
on 256 with bytes moved from the box head to the mask branch ("mask d=4"),
calibration on natural photographs instead of the task's images (out of domain),
and, for digits, the best combinations at half the rules' size
(``quantize.target_mb``). Cost columns: the time
of statistics, fitting, bias correction and permutation search; the mean time
per stage (everything); the largest per-worker statistics of a stage.
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
from bgd_dist.config import load_pipeline
from bgd_dist.core.hessian import pooled_metric, relative_output_error
from bgd_dist.core.sizing import MB
from bgd_dist.core.stats import HessianStats
from bgd_dist.messages import FitJob, FitSettings
from bgd_dist.nn.modules import get_submodule
from bgd_dist.objectives import NAMES, objective as objective_of
from bgd_dist.worker import run_fit

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("weights", "paper", "hessian")   # the order of the printed table
assert set(OBJECTIVES) == set(NAMES)
TARGET_REDUCTION = 0.25     # hessian >= 25% lower than paper, size-weighted
TARGET_SHARE = 0.90         # ... and lower on >= 90% of the layers


def model_config(which: str, overrides: list[str]):
    if which == "digits":
        return load_pipeline(ROOT / "pipelines" / "digits.yaml", ["executor.kind=serial", *overrides])
    from detection.demo import demo_config

    return demo_config(Path("runs/demo"), quick=False, executor="serial", extra=overrides)


@torch.no_grad()
def collect(model, adapter, layers, batches, run_batch) -> dict[str, HessianStats]:
    """Full input statistics of ``layers`` (LayerPlan) over ``batches`` run through ``run_batch``."""
    stats = {l.name: HessianStats.empty(l.geometry, l.block_size, l.name) for l in layers}
    handles = [get_submodule(model, n).register_forward_pre_hook(lambda m, a, s=s: s.update(a[0]))
               for n, s in stats.items()]
    try:
        model.eval()
        for batch in batches:
            run_batch(model, adapter.to_device(batch, torch.device("cpu")))
    finally:
        for h in handles:
            h.remove()
    return stats


def fit_all(teacher, plan, cfg, fit_stats, held_stats, log_each=True) -> list[dict]:
    q = cfg.quantize
    rows = []
    for l in plan.quantized:
        if not held_stats[l.name].n_inputs:
            print(f"{l.name}: no held-out input reached this layer; left out of the comparison", flush=True)
            continue
        w = get_submodule(teacher, l.name).weight.detach()
        h_fit = fit_stats[l.name].metric()
        h_held = held_stats[l.name].metric()
        row = {"layer": l.name, "kind": l.geometry.kind, "d": l.block_size, "K": l.n_centroids,
               "n_weights": l.geometry.n_weights, "row_length": l.geometry.row_length,
               "held_out_inputs": held_stats[l.name].n_inputs}
        seed = q.seed + l.order
        for objective in OBJECTIVES:
            t = time.perf_counter()
            # the metric each objective's statistics give, all derived from the same H
            stats = objective_of(objective).stats
            metric = h_fit if stats == "hessian" else pooled_metric(h_fit, l.block_size) if stats == "gram" else None
            cb = run_fit(FitJob(l.name, w, l.geometry, metric, l.n_centroids, l.block_size, seed, objective,
                                FitSettings.of(q))).codebook
            row[f"{objective}_seconds"] = time.perf_counter() - t
            decoded = cb.decode(l.geometry, l.name).half().float()       # the file stores fp16 centroids
            row[objective] = relative_output_error(w, decoded, l.geometry, h_held)
            row[f"{objective}_fit"] = relative_output_error(w, decoded, l.geometry, h_fit)
        rows.append(row)
        if log_each:
            print(format_row(row), flush=True)
    return rows


def summary(rows: list[dict], fit_stats: dict) -> dict:
    total = sum(r["n_weights"] for r in rows)
    mean = {o: sum(r[o] * r["n_weights"] for r in rows) / total for o in OBJECTIVES}
    lower = sum(r["hessian"] < r["paper"] for r in rows)
    hessian_bytes = sum(s.nbytes for s in fit_stats.values())
    gram_bytes = sum(r["d"] ** 2 * 8 for r in rows)
    t_paper = sum(r["paper_seconds"] for r in rows)
    t_hessian = sum(r["hessian_seconds"] for r in rows)
    return {
        "layers": len(rows), "size_weighted_error": mean,
        "reduction_vs_paper": 1 - mean["hessian"] / mean["paper"],
        "layers_lower": lower, "share_lower": lower / len(rows),
        "fit_seconds": {"paper": t_paper, "hessian": t_hessian}, "fit_time_ratio": t_hessian / t_paper,
        "per_layer_time_ratio_max": max(r["hessian_seconds"] / r["paper_seconds"] for r in rows),
        "stats_mb": {"hessian": hessian_bytes / MB, "gram": gram_bytes / MB},
        "largest_hessian_mb": max(s.nbytes for s in fit_stats.values()) / MB,
    }


def format_row(r: dict) -> str:
    return (f"| {r['layer']:<42} | {r['d']:>2} | {r['K']:>4} | {r['weights']:>8.4f} | {r['paper']:>8.4f} | "
            f"{r['hessian']:>8.4f} | {1 - r['hessian'] / r['paper']:>+7.1%} | "
            f"{r['hessian_seconds'] / r['paper_seconds']:>5.1f}x |")


HEAD = (f"| {'layer':<42} | {'d':>2} | {'K':>4} | {'weights':>8} | {'paper':>8} | {'hessian':>8} | "
        f"{'vs paper':>7} | {'time':>6} |")


def format_summary(name: str, s: dict) -> str:
    m = s["size_weighted_error"]
    ok_red = "ok" if s["reduction_vs_paper"] >= TARGET_REDUCTION else "MISSED"
    ok_share = "ok" if s["share_lower"] >= TARGET_SHARE else "MISSED"
    return "\n".join([
        f"{name}: {s['layers']} layers, relative layer-output error on held-out inputs, size-weighted mean:",
        f"  weights {m['weights']:.4f} | paper {m['paper']:.4f} | hessian {m['hessian']:.4f}",
        f"  hessian vs paper: {s['reduction_vs_paper']:.1%} lower (target >= {TARGET_REDUCTION:.0%}: {ok_red}); "
        f"lower on {s['layers_lower']}/{s['layers']} layers = {s['share_lower']:.0%} "
        f"(target >= {TARGET_SHARE:.0%}: {ok_share})",
        f"  fit time: paper {s['fit_seconds']['paper']:.1f} s, hessian {s['fit_seconds']['hessian']:.1f} s "
        f"(ratio {s['fit_time_ratio']:.1f}x; worst layer {s['per_layer_time_ratio_max']:.1f}x)",
        f"  statistics memory: full H {s['stats_mb']['hessian']:.2f} MB (largest layer "
        f"{s['largest_hessian_mb']:.2f} MB) vs pooled Gram {s['stats_mb']['gram'] * 1024:.1f} KiB",
    ])


def layer_benchmark(which: str, overrides: list[str]) -> dict:
    cfg = model_config(which, overrides)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model().eval()
    plan = plan_for(cfg, teacher, adapter)
    q = cfg.quantize
    t = time.perf_counter()
    fit_stats = collect(teacher, adapter, plan.quantized,
                        adapter.calibration_batches(0, 1, q.n_calibration, q.batch_size, q.seed), adapter.forward)
    held_stats = collect(teacher, adapter, plan.quantized, adapter.eval_batches(0, 1, cfg.eval.max_images),
                         lambda m, b: adapter.predict(m, b))
    print(f"{which}: statistics of {len(plan.quantized)} layers on {q.n_calibration} calibration images and "
          f"the held-out split in {time.perf_counter() - t:.1f} s", flush=True)
    print(HEAD, flush=True)
    rows = fit_all(teacher, plan, cfg, fit_stats, held_stats)
    s = summary(rows, fit_stats)
    print(format_summary(f"{which} ({cfg.name})", s), flush=True)
    return {"model": which, "pipeline": cfg.name, "rows": rows, "summary": s}


# -- end metrics ----------------------------------------------------------------------------------------------------
NO_FT = ["finetune.layerwise.enabled=false", "finetune.global.enabled=false"]
HESSIAN = ["quantize.objective=hessian"]
BIAS = ["quantize.bias_correction=true"]
PERMUTE = ["quantize.permute=true"]
TRAIN_AFFINE = [f"finetune.{phase}.{what}=true" for phase in ("layerwise", "global") for what in ("train_bn", "train_bias")]
PHOTOS = ["data.calibration=photos"]
TEACHER = ["quantize.hessian.target=teacher"]
# with the teacher target, the modules whose outputs the student takes from the teacher in the paired passes, so
# that a detector's region heads see the teacher's proposals and detections and their rows pair with the teacher's
TEACHER_FORCING = {"shapes": r"rpn\.head|roi_heads\.box_predictor"}
# the variant each *_plus.yaml pipeline is (checked by the tests): the best full pipeline measured
PLUS_VARIANTS = {"shapes": "hessian + permutations + BN/bias, full"}
# marker: the pipeline's global distillation twice as long, and on shapes 16 instead of 4 mask regions per image
LONGER_FT = "longer FT"
LONGER_FT_SETTINGS = {"shapes": ["finetune.global.epochs=6", "data.distill.mask_rois=16"],
                      "digits": ["finetune.global.epochs=6"]}
HALF_SIZE = "half size"   # marker: quantize.target_mb = half the rules' size (the first variant's)
# markers: more calibration images than the shapes pipeline's 64, up to all 400 of its training images (shapes
# only; digits already calibrates on 1024)
MORE_CALIBRATION = {"256 calib.": {"shapes": ["quantize.n_calibration=256"]},
                    "400 calib.": {"shapes": ["quantize.n_calibration=400"]}}
# marker: on shapes, the mask branch (where all of the mask AP lost without fine-tuning is lost: left in full
# precision, the mask AP is the teacher's) with d = 4 instead of 9 for its 3x3 convolutions, paid for by K = 128
# instead of 256 for the box head's fc6 (128 bytes less in all); the rules' indices are those of the pipeline
MASK_BITS = "mask d=4"
MASK_BITS_SETTINGS = {"shapes": ["quantize.rules.1.n_centroids=128",
                                 r"quantize.rules.3={match: 'roi_heads\.mask_head\..*|roi_heads\.mask_predictor"
                                 r"\.conv5_mask', block_size: 4}"]}
# the markers whose settings depend on the model, in the order they apply: a variant whose label holds one runs
# only for the models it lists
MODEL_SETTINGS = {LONGER_FT: LONGER_FT_SETTINGS, **MORE_CALIBRATION, MASK_BITS: MASK_BITS_SETTINGS}
END_VARIANTS = [
    ("paper, no fine-tuning", ["quantize.objective=paper", *NO_FT]),
    ("paper, full pipeline", ["quantize.objective=paper"]),
    ("hessian, no fine-tuning", [*HESSIAN, *NO_FT]),
    ("hessian, full pipeline", HESSIAN),
    ("hessian + bias corr., no fine-tuning", [*HESSIAN, *BIAS, *NO_FT]),
    ("hessian + bias corr., full pipeline", [*HESSIAN, *BIAS]),
    ("hessian + permutations, no fine-tuning", [*HESSIAN, *PERMUTE, *NO_FT]),
    ("hessian + permutations, full pipeline", [*HESSIAN, *PERMUTE]),
    ("all three, no fine-tuning", [*HESSIAN, *BIAS, *PERMUTE, *NO_FT]),
    ("all three, full pipeline", [*HESSIAN, *BIAS, *PERMUTE]),
    ("all three + BN/bias training, full", [*HESSIAN, *BIAS, *PERMUTE, *TRAIN_AFFINE]),
    ("hessian + permutations + BN/bias, full", [*HESSIAN, *PERMUTE, *TRAIN_AFFINE]),
    (f"hessian + perm. + BN/bias, {LONGER_FT}", [*HESSIAN, *PERMUTE, *TRAIN_AFFINE]),
    ("hessian + teacher target, no fine-tuning", [*HESSIAN, *TEACHER, *NO_FT]),
    ("hessian + teacher target, full pipeline", [*HESSIAN, *TEACHER]),
    ("hessian + teacher target + perm., no FT", [*HESSIAN, *TEACHER, *PERMUTE, *NO_FT]),
    ("hessian + teacher target + perm. + BN/bias, full", [*HESSIAN, *TEACHER, *PERMUTE, *TRAIN_AFFINE]),
    ("all four, no fine-tuning", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *NO_FT]),
    ("all four + BN/bias training, full", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *TRAIN_AFFINE]),
    ("hessian, 256 calib., no FT", [*HESSIAN, *NO_FT]),
    ("hessian + teacher target, 256 calib., no FT", [*HESSIAN, *TEACHER, *NO_FT]),
    ("h. + teacher target + perm., 256 calib., no FT", [*HESSIAN, *TEACHER, *PERMUTE, *NO_FT]),
    ("all four, 256 calib., no FT", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *NO_FT]),
    ("all four, 400 calib., no FT", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *NO_FT]),
    (f"all four, 256 calib., {MASK_BITS}, no FT", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *NO_FT]),
    ("paper, photo calibration, no FT", ["quantize.objective=paper", *PHOTOS, *NO_FT]),
    ("all three, photo calibration, no FT", [*HESSIAN, *BIAS, *PERMUTE, *PHOTOS, *NO_FT]),
    ("all four, photo calibration, no FT", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *PHOTOS, *NO_FT]),
    (f"all three, {HALF_SIZE}, no fine-tuning", [*HESSIAN, *BIAS, *PERMUTE, *NO_FT]),
    (f"hessian + teacher target, {HALF_SIZE}, no FT", [*HESSIAN, *TEACHER, *NO_FT]),
    (f"all four, {HALF_SIZE}, no fine-tuning", [*HESSIAN, *TEACHER, *BIAS, *PERMUTE, *NO_FT]),
]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def end_metrics(which: str, overrides: list[str], out: Path, only: list[str] | None = None,
                keep: bool = False) -> list[dict]:
    """Run every variant of the pipeline (serial executor, same seeds); ``only``: the variants whose
    label contains one of these strings; ``keep``: reuse a variant's finished run directory."""
    from bgd_dist.runner import run

    rows, rules_mb = [], None
    for label, extra in END_VARIANTS:
        if only and not any(o in label for o in only):
            continue
        if HALF_SIZE in label:
            if which != "digits":
                continue
            if rules_mb is None:   # the rules' size by the paper's accounting, from a plan alone
                from bgd_dist.adapters import plan_for
                from bgd_dist.core.sizing import size_report

                base = model_config(which, overrides)
                rules_mb = size_report(make_adapter(base.model, base.data).build_model(), plan_for(base)).compressed_mb
            extra = [*extra, f"quantize.target_mb={rules_mb / 2:.6f}"]
        marked = [settings for marker, settings in MODEL_SETTINGS.items() if marker in label]
        if any(which not in settings for settings in marked):
            continue
        extra = [*extra, *(item for settings in marked for item in settings[which])]
        if TEACHER[0] in extra and which in TEACHER_FORCING:
            extra = [*extra, f"quantize.teacher_forcing={TEACHER_FORCING[which]}"]
        cfg = model_config(which, [*overrides, *extra])
        run_dir = out / which / _slug(label)
        if keep and (run_dir / "report.json").exists():
            report = json.loads((run_dir / "report.json").read_text())
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            report = run(cfg, run_dir, progress=False)
        stages = report["stages"]
        row = {"model": which, "variant": label, "size_mb": report["compressed_mb"], "ratio": report["ratio"],
               "metrics": report["metrics_after"], "teacher": report["metrics_before"],
               "seconds": report["seconds"], "n_stages": len(stages),
               "stats_mb": max((s.get("stats_memory_bytes") or 0) for s in stages) / MB if stages else 0.0,
               "run_dir_mb": (report.get("run_dir_bytes") or 0) / MB}
        rows.append(row)
        print(format_end_row(row), flush=True)
    return rows


def _score(m: dict) -> str:
    if "top1" in m:
        return f"top-1 {m['top1']:.2f}"
    return f"box AP {m['box_AP']:.3f} / mask AP {m['mask_AP']:.3f}"


def _relative(m: dict, t: dict) -> str:
    if "top1" in m:
        return f"{m['top1'] - t['top1']:+.2f}"
    return f"{m['box_AP'] / t['box_AP']:.3f}x / {m['mask_AP'] / t['mask_AP']:.3f}x"


END_HEADER = ("| model  | variant                                  |    size    | ratio | metric                         "
              "| vs teacher        | collect+fit s | per stage s | stats MB | total s |")


def format_end_row(r: dict) -> str:
    sec = r["seconds"]
    prep = sum(sec.get(k, 0.0) for k in ("collect", "fit", "bias_correction", "permute"))
    return (f"| {r['model']:<6} | {r['variant']:<40} | {r['size_mb']:.4f} MB | {r['ratio']:>4.1f}x | "
            f"{_score(r['metrics']):<30} | {_relative(r['metrics'], r['teacher']):<17} | {prep:>13.1f} | "
            f"{sec['total'] / max(1, r['n_stages']):>11.1f} | {r['stats_mb']:>8.2f} | {sec['total']:>7.0f} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["digits", "shapes", "both"], default="both")
    p.add_argument("--end", action="store_true", help="also run the pipelines: paper vs hessian end metrics")
    p.add_argument("--skip-layers", action="store_true", help="only the end metrics")
    p.add_argument("--out", default="runs/bench_objective", help="run directories of --end")
    p.add_argument("--variants", nargs="+", default=None, help="--end: only the variants whose label contains one")
    p.add_argument("--keep", action="store_true", help="--end: reuse finished run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write everything to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = ["digits", "shapes"] if args.model == "both" else [args.model]
    result: dict = {"layers": [], "end": []}
    for which in models:
        if not args.skip_layers:
            result["layers"].append(layer_benchmark(which, args.overrides))
    if args.end:
        for which in models:
            result["end"].extend(end_metrics(which, args.overrides, Path(args.out), args.variants, args.keep))
    print()
    for r in result["layers"]:
        print(format_summary(f"{r['model']} ({r['pipeline']})", r["summary"]))
    if result["end"]:
        print("\nend metrics at identical size (serial executor, same seeds):")
        print(END_HEADER)
        for r in result["end"]:
            print(format_end_row(r))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
