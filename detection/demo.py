"""``bgd demo``: the whole product end to end, on two CPU cores.

1. the synthetic shapes dataset (:mod:`detection.shapes`; cached under ``OUT/shapes``);
2. the teacher: a small Mask R-CNN trained on it, the committed checkpoint
   ``detection/assets/shapes_maskrcnn.pt`` (sha256 checked; reproduce it with
   ``python -m detection.train_teacher``);
3. compression with the full pipeline (``pipelines/shapes_maskrcnn.yaml``) on a
   local Ray cluster of 2 workers: execution-order plan, sharded statistics,
   parallel codebook fitting, layer-wise and global distillation, ``model.bgd``;
4. COCO evaluation (pycocotools) of the teacher and of the compressed file,
   sharded over the workers; detections written as COCO results json;
5. a table (size, ratio, box AP, mask AP, time per phase), ``OUT/report.json``
   and ``OUT/predictions.png`` (validation images, teacher | student).

``--quick`` is a shortened configuration (fewer images and iterations) used by
the tests; it checks the same targets.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from bgd_dist.rundir import file_sha256

log = logging.getLogger("bgd.demo")

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipelines" / "shapes_maskrcnn.yaml"
TEACHER = REPO / "detection" / "assets" / "shapes_maskrcnn.pt"
TEACHER_SHA256 = "39209e4066dcb1409169515f0fc4573b596f4cc9ff0880ee2774f8e1cb5180c6"

# targets: teacher box AP >= 0.5; student >= 15x smaller (paper's accounting),
# box AP and mask AP >= 0.9 x the teacher's
MIN_TEACHER_BOX_AP = 0.5
MIN_RATIO = 15.0
MIN_RELATIVE_AP = 0.9

FULL = {"n_train": 400, "n_val": 100, "overrides": []}
QUICK = {"n_train": 120, "n_val": 40, "overrides": [
    "quantize.n_calibration=16", "quantize.n_iter=15",
    "finetune.layerwise.iterations=2", "finetune.layerwise.batch_size=4",
    "finetune.global.epochs=3", "finetune.global.iterations_per_epoch=20",
]}
PHASES = ("data", "collect", "fit", "layerwise", "global", "export", "eval_teacher", "eval_student", "figure")


def check_teacher(path: Path = TEACHER) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} is missing; re-create it with "
                                f"`python -m detection.train_teacher --out {path}`")
    digest = file_sha256(path)
    if digest != TEACHER_SHA256:
        raise ValueError(f"teacher checkpoint {path} has sha256 {digest}, expected {TEACHER_SHA256}: the file is "
                         f"damaged or was replaced (a re-trained teacher needs TEACHER_SHA256 in {__file__} updated)")
    return path


def demo_config(out: Path, quick: bool, executor: str = "ray", extra: list[str] | tuple[str, ...] = ()):
    """The demo's pipeline with the dataset written (or found) under ``out/shapes``;
    ``extra``: further ``KEY=VALUE`` overrides (benchmarks)."""
    from bgd_dist.config import load_pipeline

    from .shapes import make_shapes

    mode = QUICK if quick else FULL
    paths = make_shapes(out / "shapes", mode["n_train"], mode["n_val"], 128, seed=0)
    overrides = [f"data.{k}={v}" for k, v in paths.items()]
    overrides += [f"model.checkpoint={check_teacher()}", f"executor.kind={executor}", "executor.num_workers=2"]
    overrides += list(mode["overrides"]) + list(extra)
    return load_pipeline(PIPELINE, overrides)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, executor: str = "ray",
             progress: bool = True) -> dict:
    """Steps 1-5 (module docstring); returns the report (also ``out/report.json``)."""
    from bgd_dist import load_compressed
    from bgd_dist.adapters import make_adapter
    from bgd_dist.runner import evaluate, make_executor, run

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_start = t = time.perf_counter()
    cfg = demo_config(out, quick, executor)
    seconds["data"] = time.perf_counter() - t
    log.info("shapes dataset in %s, teacher %s (sha256 verified); compressing with %d %s workers",
             out / "shapes", TEACHER.name, cfg.executor.num_workers, cfg.executor.kind)
    adapter = make_adapter(cfg.model, cfg.data)
    run_dir = out / "run"
    if run_dir.exists():   # the demo owns this directory: a fresh run every time
        shutil.rmtree(run_dir)
    ex = make_executor(cfg)
    try:
        compressed = run(cfg, run_dir, ex, do_eval=False, progress=progress)
        for k in ("collect", "fit", "layerwise", "global", "export"):
            seconds[k] = compressed["seconds"][k]
        log.info("evaluating the teacher and the compressed file (pycocotools, %d shards)", ex.num_shards)
        t = time.perf_counter()
        teacher_metrics = evaluate(ex, adapter, "teacher", cfg.eval.max_images, out / "detections_teacher.json")
        seconds["eval_teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        ex.load_compressed(str(run_dir / "model.bgd"))   # the deliverable file, not the in-memory student
        student_metrics = evaluate(ex, adapter, "student", cfg.eval.max_images, out / "detections_student.json")
        seconds["eval_student"] = time.perf_counter() - t
    finally:
        ex.close()
    t = time.perf_counter()
    from .visualize import save_comparison

    student = load_compressed(run_dir / "model.bgd")
    save_comparison(out / "predictions.png", adapter, adapter.build_model(), student, n_images=4,
                    titles=("teacher", f"student ({compressed['compressed_mb']:.2f} MB, {compressed['ratio']:.1f}x)"))
    seconds["figure"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    targets = {
        "teacher_box_ap": teacher_metrics["box_AP"] >= MIN_TEACHER_BOX_AP,
        "ratio": compressed["ratio"] >= MIN_RATIO,
        "student_box_ap": student_metrics["box_AP"] >= MIN_RELATIVE_AP * teacher_metrics["box_AP"],
        "student_mask_ap": student_metrics["mask_AP"] >= MIN_RELATIVE_AP * teacher_metrics["mask_AP"],
    }
    report = {
        "name": "bgd demo" + (" (quick)" if quick else ""),
        "teacher": {"size_mb": compressed["uncompressed_mb"], "ratio": 1.0, **teacher_metrics},
        "student": {"size_mb": compressed["compressed_mb"], "ratio": compressed["ratio"],
                    "file_bytes": compressed["file_bytes"], **student_metrics},
        "seconds": seconds, "targets": targets, "targets_met": all(targets.values()),
        "stages": compressed["stages"], "executor": cfg.executor.kind, "num_workers": cfg.executor.num_workers,
        "config": yaml_safe(cfg.to_yaml()),
        "files": {"model": str(run_dir / "model.bgd"), "run": str(run_dir),
                  "detections_teacher": str(out / "detections_teacher.json"),
                  "detections_student": str(out / "detections_student.json"),
                  "figure": str(out / "predictions.png")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def yaml_safe(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def format_table(report: dict) -> str:
    t, s = report["teacher"], report["student"]
    rows = [f"{'model':<10} {'size MB':>9} {'ratio':>7} {'box AP':>8} {'mask AP':>8} {'box AP50':>9} {'mask AP50':>9}"]
    for name, r in (("teacher", t), ("student", s)):
        rows.append(f"{name:<10} {r['size_mb']:>9.3f} {r['ratio']:>6.1f}x {r['box_AP']:>8.4f} {r['mask_AP']:>8.4f} "
                    f"{r['box_AP50']:>9.4f} {r['mask_AP50']:>9.4f}")
    rows.append(f"student / teacher: box AP {s['box_AP'] / max(t['box_AP'], 1e-12):.3f}, "
                f"mask AP {s['mask_AP'] / max(t['mask_AP'], 1e-12):.3f} "
                f"({t['n_images']} validation images)")
    secs = report["seconds"]
    rows.append("wall time (s): " + ", ".join(f"{k} {secs[k]:.1f}" for k in (*PHASES, "total") if k in secs))
    ok = report["targets"]
    rows.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in ok.items()))
    return "\n".join(rows)


def demo_main(args) -> int:
    """``bgd demo [--out DIR] [--quick] [--executor ray|serial]``."""
    report = run_demo(args.out, quick=args.quick, executor=args.executor)
    print(format_table(report))
    out = Path(args.out)
    print(f"wrote {out / 'report.json'}, {out / 'predictions.png'} and {out / 'run' / 'model.bgd'}")
    if not report["targets_met"]:
        missed = [k for k, v in report["targets"].items() if not v]
        print(f"bgd demo: targets missed: {', '.join(missed)}")
        return 1
    return 0
