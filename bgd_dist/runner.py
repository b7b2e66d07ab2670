"""The sequential driver: stage after stage, collect -> fit -> swap -> distill -> checkpoint.

The statistics of stage ``s`` are collected on the student in which every
stage before ``s`` is already quantized and fine-tuned (METHOD.md §3). Each
finished stage is written durably and only then marked done in
``manifest.json``; ``resume=True`` replays finished stages forward-only (their
saved, fine-tuned codebooks are swapped in without recomputation) and
continues with the next one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .adapters import make_adapter, plan_for
from .config import PipelineConfig
from .core.sizing import MB, size_report
from .core.stats import HessianStats, memory_groups
from .executor import Executor, SerialExecutor
from .finetune import global_spec, layerwise_spec
from .io import atomic_write, atomic_write_text
from .nn.modules import get_submodule, pq_layers, quantize_
from .plan import Plan
from .student import student_state
from .worker import FitJob

log = logging.getLogger("bgd.runner")

MANIFEST_VERSION = 1


class InjectedFailure(RuntimeError):
    """Raised by ``fail_after_stage`` (tests of resume)."""


# -- small persistent pieces ----------------------------------------------------------------------
class JsonlLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, **fields) -> None:
        record = {"time": time.time(), "event": event, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def tensor_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_fingerprint(cfg: PipelineConfig, teacher: torch.nn.Module, adapter) -> dict:
    """What must be equal for ``--resume`` to continue a run: model, data and config."""
    conf = yaml.safe_load(cfg.to_yaml())
    conf["executor"] = {"num_workers": cfg.executor.num_workers}  # shards matter, the rest does not
    data = adapter.data_fingerprint() if hasattr(adapter, "data_fingerprint") else cfg.data
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": tensor_digest(teacher.state_dict()), "data": digest(data), "config": digest(conf)}


class Manifest:
    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.data = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "stages": {}}

    @classmethod
    def open(cls, path: Path, fingerprint: dict, resume: bool) -> "Manifest":
        m = cls(path, fingerprint)
        if path.exists():
            if not resume:
                raise FileExistsError(f"{path.parent} already holds a run; pass --resume to continue it "
                                      f"or choose another --out directory")
            old = json.loads(path.read_text())
            if old.get("version") != MANIFEST_VERSION:
                raise ValueError(f"{path}: manifest version {old.get('version')} is not supported")
            diff = [k for k in fingerprint if old["fingerprint"].get(k) != fingerprint[k]]
            if diff:
                raise ValueError(f"{path}: cannot resume: the {', '.join(diff)} differ(s) from the run "
                                 f"recorded there; use a new --out directory")
            m.data = old
        return m

    def done(self, stage: int) -> bool:
        return self.data["stages"].get(str(stage), {}).get("status") == "done"

    def mark(self, stage: int, **info) -> None:
        self.data["stages"][str(stage)] = {"status": "done", **info}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def save_stage(path: Path, student: torch.nn.Module, names: list[str]) -> None:
    layers = pq_layers(student)
    obj = {}
    for n in names:
        obj[f"{n}.centroids"] = layers[n].centroids.detach().cpu().clone()
        obj[f"{n}.assignments"] = layers[n].assignments.detach().cpu().clone()
    atomic_write(path, lambda f: torch.save(obj, f))


def load_stage_stats(path: Path) -> dict:
    """The merged statistics a finished stage was fitted with (``stages/<k>/stats.pt``)."""
    from .core.stats import stats_from_state

    return {n: stats_from_state(st) for n, st in torch.load(path, map_location="cpu", weights_only=True).items()}


def load_stage(path: Path, names: list[str]) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    missing = [n for n in names if f"{n}.centroids" not in obj]
    if missing:
        raise ValueError(f"{path}: stage file lacks layers {missing}")
    return obj


def _codebooks_from(obj: dict, names: list[str]):
    from .core.kmeans import Codebook

    return {n: Codebook(obj[f"{n}.centroids"], obj[f"{n}.assignments"], ()) for n in names}


# the statistics each objective collects, and the fit each statistics type drives
FIT_OBJECTIVE = {"identity": "weights", "gram": "paper", "hessian": "hessian"}


def stats_kind(layer, hessian_cfg) -> str:
    """``identity`` (weights), ``gram`` (paper) or ``hessian``; a ``hessian`` layer whose
    L x L float64 matrix would exceed ``hessian_cfg.max_mb``, or a grouped convolution,
    falls back to ``gram``."""
    if layer.objective == "weights":
        return "identity"
    if layer.objective == "hessian":
        return "hessian" if hessian_fallback(layer, hessian_cfg) is None else "gram"
    return "gram"


def hessian_fallback(layer, hessian_cfg) -> str | None:
    """Why a layer cannot use its full input statistics (None: it can)."""
    if layer.geometry.groups != 1:
        return f"it is a grouped convolution (groups = {layer.geometry.groups}; each group sees its own inputs)"
    mb = HessianStats.bytes_for(layer.geometry) / MB
    if mb > hessian_cfg.max_mb:
        return (f"its {layer.geometry.row_length}x{layer.geometry.row_length} input Hessian ({mb:.1f} MB) exceeds "
                f"quantize.hessian.max_mb = {hessian_cfg.max_mb:g}")
    return None


def collect_groups(layers: list[tuple], max_bytes: float) -> list[list[tuple]]:
    """Split a stage's ``(name, geometry, d, kind)`` into calibration passes so that the Hessians
    of one pass stay within ``max_bytes`` (the small statistics go with the pass they come in)."""
    return memory_groups(layers, lambda e: HessianStats.bytes_for(e[1]) if e[3] == "hessian" else 0, max_bytes)


# -- the run ---------------------------------------------------------------------------------------
def make_executor(cfg: PipelineConfig, kind: str | None = None, address: str | None = None) -> Executor:
    e = cfg.executor
    kind = kind or e.kind
    if kind == "serial":
        return SerialExecutor(num_shards=e.num_workers)
    from .distributed.ray_executor import RayExecutor

    return RayExecutor(num_workers=e.num_workers, address=address or e.address, num_cpus=e.num_cpus,
                       num_gpus_per_worker=e.num_gpus_per_worker, max_in_flight=e.max_fit_tasks,
                       actor_resources=e.actor_resources, schedule_timeout_s=e.schedule_timeout_s,
                       start_timeout_s=e.start_timeout_s)


def evaluate(executor: Executor, adapter, which: str, max_images: int | None,
             results_path: str | Path | None = None) -> dict:
    """Evaluate the workers' teacher or student on every shard, merge, score once. An
    evaluator with ``write_results`` (COCO) also writes its detections to ``results_path``."""
    evaluator = adapter.evaluator()
    evaluator.merge(executor.evaluate(which, max_images))
    metrics = evaluator.result()
    if results_path is not None and hasattr(evaluator, "write_results"):
        evaluator.write_results(results_path)
    return metrics


def run(cfg: PipelineConfig, out_dir: str | Path, executor: Executor | None = None, resume: bool = False,
        do_eval: bool = True, fail_after_stage: int | None = None, progress: bool = True) -> dict:
    """Compress ``cfg``'s model into ``out_dir/model.bgd``; returns the report (also ``report.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {"collect": 0.0, "fit": 0.0, "layerwise": 0.0, "global": 0.0, "export": 0.0,
                               "eval": 0.0}
    t_run = time.perf_counter()
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    fingerprint = run_fingerprint(cfg, teacher, adapter)
    manifest = Manifest.open(out / "manifest.json", fingerprint, resume)
    jlog = JsonlLog(out / "log.jsonl")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    plan_path = out / "plan.json"
    planned = resume and plan_path.exists()
    plan = Plan.load(plan_path) if planned else plan_for(cfg, teacher, adapter)
    q = cfg.quantize
    own_executor = executor is None
    executor = executor or make_executor(cfg)
    report: dict = {"name": cfg.name, "stages": []}
    student = copy.deepcopy(teacher)
    quantized_bytes = 0.0
    try:
        executor.start(cfg.model, cfg.data)
        if not planned:
            if q.target_mb is not None:
                from .allocation import allocate_plan

                t = time.perf_counter()
                plan, allocation = allocate_plan(cfg, teacher, plan, executor, progress)
                times["allocate"] = time.perf_counter() - t
                atomic_write_text(out / "allocation.json", json.dumps(allocation, indent=1))
                jlog.write("allocation", target_mb=q.target_mb, compressed_mb=allocation["compressed_mb"],
                           predicted_error=allocation["predicted_error"], seconds=allocation["seconds"])
            plan.save(plan_path)
        uncompressed = size_report(teacher, plan)
        layer_sizes = {ls.name: ls for ls in uncompressed.layers}
        metrics_before = None
        if do_eval:
            t = time.perf_counter()
            metrics_before = evaluate(executor, adapter, "teacher", cfg.eval.max_images,
                                      out / "detections_teacher.json")
            times["eval"] += time.perf_counter() - t
            log.info("teacher: %s", metrics_before)
            jlog.write("eval", model="teacher", metrics=metrics_before)
        bar = tqdm(plan.stages, desc="stages", unit="stage", disable=not progress)
        for s, names in enumerate(bar):
            names = list(names)
            entries = [plan.layer(n) for n in names]
            stage_file = out / "stages" / str(s) / "codebooks.pt"
            if manifest.done(s):
                quantize_(student, plan, _codebooks_from(load_stage(stage_file, names), names))
                quantized_bytes += sum(layer_sizes[n].nbytes for n in names)
                log.info("stage %d/%d %s: replayed from %s", s + 1, len(plan.stages), names, stage_file)
                continue
            # a. statistics on the current student (earlier stages quantized and fine-tuned)
            t = time.perf_counter()
            shipped = executor.load_student(student_state(student))
            kinds = {l.name: stats_kind(l, q.hessian) for l in entries}
            for l in entries:
                if l.objective == "hessian" and kinds[l.name] != "hessian":
                    why = hessian_fallback(l, q.hessian)
                    log.warning("stage %d/%d %s: %s; using the pooled Gram (paper objective) for this layer",
                                s + 1, len(plan.stages), l.name, why)
                    jlog.write("hessian_fallback", stage=s, layer=l.name, reason=why)
            layers = [(l.name, l.geometry, l.block_size, kinds[l.name]) for l in entries]
            need_stats = any(kind != "identity" for *_, kind in layers)
            stats = {}
            passes: list = []
            peak = 0       # statistics held by one worker at a time (bytes)
            stats_bytes = 0   # returned to the driver by all shards
            if need_stats:
                passes = collect_groups(layers, q.hessian.max_mb * MB)
                with tqdm(total=q.n_calibration * len(passes), desc=f"collect {s}", unit="img", leave=False,
                          disable=not progress) as pbar:
                    for group in passes:   # several passes only when the stage's Hessians exceed max_mb
                        part = executor.collect(group, q.n_calibration, q.batch_size, q.seed * 1000 + s,
                                                progress=pbar.update)
                        peak = max(peak, sum(st.nbytes for st in part.values()))
                        stats.update(part)
                atomic_write(out / "stages" / str(s) / "stats.pt",
                             lambda f: torch.save({n: st.state() for n, st in stats.items()}, f))
                stats_bytes = sum(st.nbytes for st in stats.values()) * getattr(executor, "num_shards", 1)
                log.info("stage %d/%d statistics (%s, %d calibration pass%s): %.3f MB per worker, %.3f MB "
                         "returned to the driver", s + 1, len(plan.stages), ", ".join(sorted(set(kinds.values()))),
                         len(passes), "" if len(passes) == 1 else "es", peak / MB, stats_bytes / MB)
            times["collect"] += time.perf_counter() - t
            # b. one codebook per layer
            t = time.perf_counter()
            jobs = []
            for l in entries:
                metric = None
                if kinds[l.name] != "identity":
                    stats[l.name].check()
                    metric = stats[l.name].metric()
                weight = get_submodule(student, l.name).weight.detach().cpu()
                jobs.append(FitJob(l.name, weight, l.geometry, metric, l.n_centroids, l.block_size, q.n_iter,
                                   q.init, q.seed + l.order, q.refine, FIT_OBJECTIVE[kinds[l.name]],
                                   q.hessian.rounds, q.hessian.damp, q.hessian.cg_steps))
            with tqdm(total=len(jobs), desc=f"fit {s}", unit="layer", leave=False, disable=not progress) as fbar:
                fitted = executor.fit(jobs, progress=lambda *a: fbar.update())
            times["fit"] += time.perf_counter() - t
            codebooks = {n: cb for n, (cb, _) in fitted.items()}
            # c. swap in the quantized layers
            quantize_(student, plan, codebooks)
            for l in entries:
                cb, seconds = fitted[l.name]
                quantized_bytes += layer_sizes[l.name].nbytes
                obj = cb.objective
                log.info("stage %d/%d %s: d=%d K=%d %.3f bits/w %s objective %.4f -> %.4f fit %.2fs | "
                         "quantized so far %.3f MB", s + 1, len(plan.stages), l.name, l.block_size,
                         l.n_centroids, layer_sizes[l.name].bits_per_weight, FIT_OBJECTIVE[kinds[l.name]],
                         obj[0], obj[-1], seconds, quantized_bytes / MB)
                jlog.write("layer", stage=s, layer=l.name, block_size=l.block_size, n_centroids=l.n_centroids,
                           objective=FIT_OBJECTIVE[kinds[l.name]],
                           bits_per_weight=layer_sizes[l.name].bits_per_weight, objective_start=obj[0],
                           objective_end=obj[-1], fit_seconds=seconds, quantized_mb_so_far=quantized_bytes / MB,
                           n_empty_repaired=cb.n_empty_repaired)
            # d. layer-wise distillation of this stage's centroids
            losses = []
            if cfg.finetune.layerwise.enabled and cfg.finetune.layerwise.iterations > 0:
                t = time.perf_counter()
                executor.load_student(student_state(student))
                result = executor.distill(layerwise_spec(cfg.finetune.layerwise, names, seed=q.seed * 1000 + s))
                _apply_distill(student, result)
                losses = result["losses"]
                times["layerwise"] += time.perf_counter() - t
                log.info("stage %d/%d layer-wise distillation: %d it, loss %.4f -> %.4f", s + 1, len(plan.stages),
                         len(losses), losses[0], losses[-1])
            # e. checkpoint, then mark done
            save_stage(stage_file, student, names)
            manifest.mark(s, layers=names, files=[str(stage_file.relative_to(out))], bytes_shipped=shipped)
            stage_info = {"stage": s, "layers": names, "bytes_shipped": shipped, "stats_bytes_returned": stats_bytes,
                          "stats_memory_bytes": peak, "stats_passes": len(passes),
                          "stats_kinds": sorted(set(kinds.values())),
                          "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}
            report["stages"].append(stage_info)
            jlog.write("stage", **stage_info)
            if fail_after_stage is not None and s == fail_after_stage:
                raise InjectedFailure(f"injected failure after stage {s}")
        # global distillation of every centroid
        if cfg.finetune.global_.enabled and cfg.finetune.global_.epochs * cfg.finetune.global_.iterations_per_epoch:
            t = time.perf_counter()
            executor.load_student(student_state(student))
            result = executor.distill(global_spec(cfg.finetune.global_, seed=q.seed * 1000 + 999))
            _apply_distill(student, result)
            times["global"] += time.perf_counter() - t
            log.info("global distillation: %d it, loss %.4f -> %.4f", len(result["losses"]),
                     result["losses"][0], result["losses"][-1])
            jlog.write("global", losses_start=result["losses"][0], losses_end=result["losses"][-1],
                       iterations=len(result["losses"]))
        # export: the file stores fp16 centroids; round the student so the metrics below are the file's
        _round_centroids_fp16(student)
        t = time.perf_counter()
        from .fileformat import save_compressed

        sizes = size_report(student, plan)
        save_compressed(out / "model.bgd", student, plan, adapter.arch(),
                        metadata={"name": cfg.name, "compressed_mb": sizes.compressed_mb})
        times["export"] += time.perf_counter() - t
        metrics_after = None
        if do_eval:
            t = time.perf_counter()
            executor.load_student(student_state(student))
            metrics_after = evaluate(executor, adapter, "student", cfg.eval.max_images,
                                     out / "detections_student.json")
            times["eval"] += time.perf_counter() - t
            log.info("student: %s", metrics_after)
            jlog.write("eval", model="student", metrics=metrics_after)
    finally:
        if own_executor:
            executor.close()
    report.update({
        "uncompressed_mb": uncompressed.uncompressed_mb, "compressed_mb": sizes.compressed_mb,
        "ratio": sizes.ratio, "file_bytes": (out / "model.bgd").stat().st_size,
        "metrics_before": metrics_before, "metrics_after": metrics_after,
        "seconds": {**times, "total": time.perf_counter() - t_run},
    })
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    jlog.write("report", **report)
    return report


def _round_centroids_fp16(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in pq_layers(model).values():
            layer.centroids.copy_(layer.centroids.half().to(layer.centroids.dtype))


def _apply_distill(student: torch.nn.Module, result: dict) -> None:
    layers = pq_layers(student)
    with torch.no_grad():
        for name, c in result["centroids"].items():
            layers[name].centroids.copy_(c)
        if "buffers" in result:
            buffers = dict(student.named_buffers())
            for k, v in result["buffers"].items():
                buffers[k].copy_(v)
