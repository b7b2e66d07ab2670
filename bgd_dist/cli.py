"""The ``bgd`` command line: a small argparse subcommand tree; tests call the functions directly."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("bgd")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file (see pipelines/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline setting, e.g. --set data.train=/data/imagenet/train")


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["ray", "serial"], help="override executor.kind")
    p.add_argument("--address", help="join an existing Ray cluster: auto or HOST:PORT")


def cmd_size(args) -> int:
    from .adapters import plan_for
    from .config import load_pipeline
    from .core.sizing import size_report
    from .adapters import build_architecture, make_adapter
    from .config import require_all

    cfg = load_pipeline(args.pipeline, args.overrides)
    adapter = make_adapter(cfg.model, cfg.data)
    allocation = None
    if args.plan:
        from .plan import Plan

        model = build_architecture(adapter.arch())
        plan = Plan.load(args.plan)
    elif cfg.quantize.target_mb is not None:
        # the allocation needs the trained weights and calibration data: the same code as a run
        from .allocation import allocate_plan, format_allocation
        from .executor import SerialExecutor

        require_all(cfg, ignore=lambda key: key.startswith("data.val"))
        model = adapter.build_model()
        plan = plan_for(cfg, model, adapter)
        log.info("allocating %.4f MB over %d layers (statistics on the teacher, in this process)",
                 cfg.quantize.target_mb, len(plan.quantized))
        with SerialExecutor(num_shards=1) as executor:
            executor.start(cfg.model, cfg.data)
            plan, allocation = allocate_plan(cfg, model, plan, executor, progress=not args.json)
    else:
        model = build_architecture(adapter.arch())
        plan = plan_for(cfg, model, adapter)
    report = size_report(model, plan)
    if args.json:
        out = report.to_dict()
        if allocation is not None:
            out["allocation"] = allocation
        emit(json.dumps(out, indent=1))
    else:
        emit(format_size_table(report, cfg.name)
             + ("\n\n" + format_allocation(allocation) if allocation is not None else ""))
    return 0


def emit(text: str) -> None:
    """Print ``text``; a reader that stops early (``bgd size ... | head``) is not an error: the
    rest is dropped quietly."""
    import os

    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)   # so that the flush at exit does not fail again
        os.dup2(devnull, sys.stdout.fileno())


def format_size_table(report, title: str = "") -> str:
    rows = [f"{'layer':<44} {'kind':<16} {'shape':<18} {'d':>3} {'K':>5} {'bits/w':>7} {'MB':>8}"]
    for l in report.layers:
        shape = "x".join(str(s) for s in l.weight_shape)
        if l.skip:
            rows.append(f"{l.name:<44} {l.kind:<16} {shape:<18} {'-':>3} {'-':>5} {32.0:>7.2f} "
                        f"{l.n_weights * 4 / 2**20:>8.4f}  (uncompressed)")
        else:
            rows.append(f"{l.name:<44} {l.kind:<16} {shape:<18} {l.block_size:>3} {l.n_centroids:>5} "
                        f"{l.bits_per_weight:>7.3f} {l.nbytes / 2**20:>8.4f}")
    rows.append(f"other parameters (fp32): {report.other_bytes / 2**20:.4f} MB")
    rows.append(f"{title}: uncompressed {report.uncompressed_mb:.2f} MB -> compressed "
                f"{report.compressed_mb:.2f} MB ({report.ratio:.1f}x)")
    return "\n".join(rows)


def cmd_status(args) -> int:
    from .status import format_status, run_status

    st = run_status(args.run_dir)
    print(json.dumps(st, indent=1, default=float) if args.json else format_status(st))
    return 0


def cmd_inspect(args) -> int:
    from .fileformat import format_inspect, inspect_file

    info = inspect_file(args.file)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    return 0


def cmd_export(args) -> int:
    from .export import export_file

    out = export_file(args.file, args.format, args.out, input_size=args.input_size, opset=args.opset)
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_import_ktb(args) -> int:
    from .interop.ktb import import_ktb

    import_ktb(args.file, args.arch, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_quantize(args) -> int:
    from .config import load_pipeline
    from .runner import make_executor, run

    overrides = list(args.overrides)
    if args.skip_layerwise:
        overrides.append("finetune.layerwise.enabled=false")
    if args.skip_global:
        overrides.append("finetune.global.enabled=false")
    if args.weights_only:
        overrides.append("quantize.objective=weights")
    elif args.objective:
        overrides.append(f"quantize.objective={args.objective}")
    cfg = load_pipeline(args.pipeline, overrides)
    executor = make_executor(cfg, kind=args.executor, address=args.address)
    out = args.out or f"runs/{cfg.name}"
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():   # log lines print above the progress bars, not through them
            report = run(cfg, out, executor, resume=args.resume, do_eval=not args.no_eval,
                         progress=not args.no_progress)
    finally:
        executor.close()
    print(format_report(report))
    print(f"wrote {out}/model.bgd and {out}/report.json")
    return 0


def cmd_eval(args) -> int:
    """Evaluate the pipeline's teacher, or a compressed file, with the adapter's evaluator."""
    from pathlib import Path

    from .adapters import build_architecture, make_adapter, plan_for
    from .config import load_pipeline, require_all
    from .core.sizing import size_report
    from .runner import evaluate, make_executor

    cfg = load_pipeline(args.pipeline, args.overrides)
    # the evaluation data only; with --model the model comes from the file (no teacher weights)
    require_all(cfg, ignore=lambda key: key.startswith("data.train") or bool(args.model and key.startswith("model.")))
    adapter = make_adapter(cfg.model, cfg.data)
    executor = make_executor(cfg, kind=args.executor, address=args.address)
    try:
        executor.start(cfg.model, cfg.data)
        if args.model:
            path = Path(args.model).resolve()
            from .fileformat import inspect_file

            info = inspect_file(path)
            size_mb, ratio, label = info["accounted_mb"], info["ratio"], path.name
            executor.load_compressed(str(path))
            metrics = evaluate(executor, adapter, "student", args.max_images or cfg.eval.max_images, args.results)
        else:
            model = build_architecture(adapter.arch())
            report = size_report(model, plan_for(cfg, model, adapter))
            size_mb, ratio, label = report.uncompressed_mb, 1.0, f"{cfg.name} (teacher)"
            metrics = evaluate(executor, adapter, "teacher", args.max_images or cfg.eval.max_images, args.results)
    finally:
        executor.close()
    row = {"model": label, "size_mb": size_mb, "ratio": ratio, **metrics}
    if args.json:
        print(json.dumps(row, indent=1))
    else:
        print("  ".join(f"{k:>12}" for k in row))
        print("  ".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}" for v in row.values()))
    return 0


def _run_external(target: str):
    """A subcommand implemented by an adapter package, imported by name at run time."""

    def run_it(args) -> int:
        from .adapters import import_object

        return import_object(target)(args)

    return run_it


def format_report(report: dict) -> str:
    lines = [f"{report['name']}: {report['uncompressed_mb']:.2f} MB -> {report['compressed_mb']:.3f} MB "
             f"({report['ratio']:.1f}x), file {report['file_bytes'] / 2**20:.3f} MB"]
    for key in ("metrics_before", "metrics_after"):
        if report.get(key):
            lines.append(f"  {key.replace('_', ' ')}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report[key].items()))
    lines.append("  seconds: " + ", ".join(f"{k}={v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    from .objectives import NAMES as OBJECTIVE_NAMES

    parser = argparse.ArgumentParser(prog="bgd", description="Activation-aware product quantization on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("size", help="per-layer size table of a pipeline (architecture only; with "
                                    "quantize.target_mb, the allocation, computed on the teacher and its data)")
    _add_pipeline(p)
    p.add_argument("--plan", help="show the allocation of this plan.json (a run directory's) instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_size)

    p = sub.add_parser("quantize", help="compress a model: stage by stage, then export model.bgd")
    _add_pipeline(p)
    p.add_argument("--out", help="run directory (default runs/<name>)")
    _add_executor(p)
    p.add_argument("--resume", action="store_true", help="continue after the last finished stage")
    p.add_argument("--skip-layerwise", action="store_true", help="no layer-wise distillation")
    p.add_argument("--skip-global", action="store_true", help="no global distillation")
    p.add_argument("--weights-only", action="store_true", help="weights-only objective (classic PQ baseline)")
    p.add_argument("--objective", choices=list(OBJECTIVE_NAMES),
                   help="the default objective of every layer (rules may still set their own)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation before and after")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="evaluate the teacher or a compressed model file")
    _add_pipeline(p)
    p.add_argument("--model", help="a compressed model file (model.bgd); default: the teacher")
    _add_executor(p)
    p.add_argument("--max-images", type=int, help="evaluate on a fixed subset of N images")
    p.add_argument("--results", help="detection: write the detections to this COCO results json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("make-shapes", help="write the synthetic COCO-format shapes dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_external("detection.shapes:make_shapes_main"))

    p = sub.add_parser("demo", help="the end-to-end demo: shapes data, Mask R-CNN teacher, compress, evaluate")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a shortened configuration (tests)")
    p.add_argument("--executor", choices=["ray", "serial"], default="ray")
    p.set_defaults(func=_run_external("detection.demo:demo_main"))

    p = sub.add_parser("status", help="where a run is (stage, phase, step, loss, ETA, size, restarts), "
                                      "from its run directory alone")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("inspect", help="describe a compressed model file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a compressed model file as a plain dense model: a state dict, "
                                      "TorchScript, ONNX or safetensors")
    p.add_argument("file", help="a compressed model file (model.bgd)")
    p.add_argument("--format", required=True, choices=["dense", "torchscript", "onnx", "safetensors"])
    p.add_argument("--out", required=True, help="the file to write (atomically)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="onnx: the example input's size (default: the file's recorded preprocessing)")
    p.add_argument("--opset", type=int, help="onnx: the opset version (default: the exporter's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-ktb", help="convert a checkpoint released by the reference implementation")
    p.add_argument("file")
    p.add_argument("--arch", choices=["resnet18", "resnet50"], required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_ktb)
    for p in sub.choices.values():   # -v also after the subcommand (bgd size X -v)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success; 2 usage and configuration errors (bad arguments, an invalid pipeline or
    setting, a named input file that does not exist); 1 failures at run time (the cluster, Ray, a
    worker, I/O), reported on one line; ``-v`` logs the traceback (debug level)."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"bgd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        log.debug("bgd %s failed", args.command, exc_info=True)
        hint = "" if args.verbose else " (-v shows the traceback)"
        code = exit_code(e)
        print(f"bgd {args.command}: error: {one_line(e)}" + (hint if code == 1 else ""), file=sys.stderr)
        return code


def _from_ray(error: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(error).__mro__)


def exit_code(error: BaseException) -> int:
    """2 for a usage or configuration error, 1 for a failure at run time."""
    if _from_ray(error):   # raised in a worker (Ray wraps it in a subclass of the original type)
        return 1
    return 2 if isinstance(error, (ValueError, FileNotFoundError)) else 1


def one_line(error: BaseException) -> str:
    """An exception as one line. Ray errors carry the remote traceback: their last
    ``SomeError: message`` line is the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if _from_ray(error):
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if ":" in line and " " not in head and head.endswith(("Error", "Exception", "Interrupt")):
                return line
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
