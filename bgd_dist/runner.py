"""The sequential driver: stage after stage, collect -> fit -> swap -> distill -> checkpoint.

The statistics of stage ``s`` are collected on the student in which every
stage before ``s`` is already quantized and fine-tuned (METHOD.md §3). Each
finished stage is written durably and only then marked done in
``manifest.json``; ``resume=True`` replays finished stages forward-only (their
saved, fine-tuned codebooks are swapped in without recomputation) and
continues with the next one.

A run is a :class:`Run` (what every step reads and writes: config, run
directory, adapter, teacher, student, plan, executor, manifest, log, timers,
seeds) and, per stage, a :class:`Stage` that the steps below fill in turn::

    for each stage:  replay  |  collect -> fit -> swap [-> correct_bias] -> distill -> checkpoint
    then:            global distillation -> export -> evaluation -> report
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import check_architecture, make_adapter, plan_for
from .config import PipelineConfig, require_all
from .core.sizing import MB, size_report
from .core.stats import STATS_TYPES, memory_groups
from .executor import Executor, SerialExecutor
from .finetune import (Diverged, PhaseSpec, PhaseState, batchnorms_after, check_divergence, global_spec,
                       layerwise_spec, trainable_parameters)
from .io import atomic_write_text
from .messages import CollectRequest, FitJob, FitResult, FitSettings, LayerRequest, OutputMomentsRequest
from .nn.modules import get_submodule, pq_layers, quantize_
from .objectives import Objective, layer_damp, relative_objective, resolve
from .phases import checkpoint_path, run_phase
from .plots import LossPlot
from .progress import bar as progress_bar
from .plan import LayerPlan, Plan
from .rundir import (MANIFEST_VERSION, JsonlLog, Manifest, codebooks_from, corrected_from,  # noqa: F401
                     directory_bytes, fingerprinted_config, load_stage, load_stage_stats, run_fingerprint, save_stage,
                     save_stage_stats, tensor_digest)
from .runlock import RunDirectoryLocked, RunLock  # noqa: F401 (re-exported)
from .seeds import Seeds
from .student import student_state
from .worker import forced_modules

log = logging.getLogger("bgd.runner")


class DistillationDiverged(RuntimeError):
    """A distillation phase diverged and was not (or no longer) retried; the message is one line."""


class InjectedFailure(RuntimeError):
    """Raised by ``fail_after_stage`` (tests of resume)."""


class Timers:
    """Seconds spent per phase of a run, summed over the stages."""

    def __init__(self, *names: str):
        self.seconds: dict[str, float] = {n: 0.0 for n in names}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


def collect_groups(layers: list[LayerRequest], max_bytes: float) -> list[list[LayerRequest]]:
    """Split a stage's statistics requests into calibration passes so that the Hessians of one
    pass stay within ``max_bytes`` (the small statistics go with the pass they come in)."""
    return memory_groups(layers, lambda l: STATS_TYPES[l.stats].bytes_for(l.geometry)
                         if hasattr(STATS_TYPES[l.stats], "bytes_for") else 0, max_bytes)


# -- the run and its stages ------------------------------------------------------------------------
@dataclass
class Run:
    """What the steps of a run share."""

    cfg: PipelineConfig
    out: Path
    adapter: object
    teacher: nn.Module
    manifest: Manifest
    log: JsonlLog
    progress: bool = True
    executor: Executor | None = None
    plan: Plan | None = None
    planned: bool = False                   # the plan was read back from plan.json (resume)
    student: nn.Module | None = None
    seeds: Seeds = field(default_factory=lambda: Seeds(0))
    timers: Timers = field(default_factory=lambda: Timers("collect", "fit", "layerwise", "global", "export",
                                                          "eval"))
    report: dict = field(default_factory=dict)
    quantized_bytes: float = 0.0
    metrics_before: dict | None = None
    metrics_after: dict | None = None
    folded_bn: list[str] = field(default_factory=list)   # BatchNorm layers found folded at plan time
    plot: LossPlot | None = None            # losses.png, refreshed at distillation checkpoints
    skipped_items: list = field(default_factory=list)     # unreadable input files left out (on_bad_image: skip)
    bn_after: dict | None = None            # {layer: the BatchNorm right after it}, traced when train_bn needs it

    @classmethod
    def open(cls, cfg: PipelineConfig, out_dir: str | Path, resume: bool, progress: bool,
             adapter=None) -> "Run":
        """Build the teacher, check (or start) the run directory, write ``config.yaml`` and
        compute (or, on resume, read back) the plan. ``adapter``: an adapter instance that holds
        its model and data (the Python API); default: the one ``cfg.model`` names."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        adapter = adapter if adapter is not None else make_adapter(cfg.model, cfg.data)
        check_architecture(adapter.arch())   # before any work: the exported file must be loadable
        teacher = adapter.build_model()
        forced_modules(cfg.quantize.teacher_forcing, teacher)   # before any work: must name modules of the model
        manifest = Manifest.open(out / "manifest.json", run_fingerprint(cfg, teacher, adapter), resume,
                                 fingerprinted_config(cfg))
        r = cls(cfg, out, adapter, teacher, manifest, JsonlLog(out / "log.jsonl"), progress,
                seeds=Seeds(cfg.quantize.seed), report={"name": cfg.name, "stages": []})
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
        if resume and r.plan_path.exists():
            problem = manifest.plan_problem(r.plan_path)
            r.planned = problem is None
            if problem is not None:
                log.warning("%s; computing the plan again", problem)
                r.log.write("plan_recomputed", reason=problem)
        r.plan = Plan.load(r.plan_path) if r.planned else plan_for(cfg, teacher, adapter)
        r.student = copy.deepcopy(teacher)
        r.plot = LossPlot(out)
        return r

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.json"

    @property
    def layer_sizes(self) -> dict:
        return {ls.name: ls for ls in size_report(self.teacher, self.plan).layers}

    def stages(self):
        sizes = self.layer_sizes
        with progress_bar(len(self.plan.stages), "stages", "stage", self.progress) as bar:
            for s, names in enumerate(self.plan.stages):
                yield Stage(s, len(self.plan.stages), [self.plan.layer(n) for n in names],
                            self.out / "stages" / str(s), {n: sizes[n] for n in names})
                bar.update(1)

    def distill(self, spec: PhaseSpec, stage: int | None = None) -> PhaseState:
        """A distillation phase on the workers (who hold the driver's student), in pieces of
        ``finetune.checkpoint_every`` steps, each checkpointed, continuing from the phase's
        checkpoint when there is one (:mod:`bgd_dist.phases`); the result is copied into the student."""
        f = self.cfg.finetune
        where = ("global distillation" if stage is None
                 else f"layer-wise distillation of stage {stage + 1}/{len(self.plan.stages)}")
        for attempt in range(f.max_lr_retries + 1):
            log.info("%s distillation%s: %d steps, batch %d, lr %g%s", spec.name,
                     "" if stage is None else f" of stage {stage + 1}", spec.iterations, spec.batch_size, spec.lr,
                     f"; also trains {', '.join(spec.params)}" if spec.params else "")
            self.log.write("phase_lr", phase=spec.name, stage=stage, lr=spec.lr, batch_size=spec.batch_size,
                           attempt=attempt)
            self.ship_student()   # the phase's start: also what a diverged attempt goes back to
            path = checkpoint_path(self.out, spec, stage)
            try:
                result = run_phase(self.executor, spec, path, f.checkpoint_every, self.student, self.log.write,
                                   stage=stage, show=self.progress, on_checkpoint=self.plot.refresh,
                                   guard=lambda sp, st, first: check_divergence(sp, st, f.divergence_factor, first))
            except Diverged as e:
                retry = f.on_divergence == "retry_lower_lr" and attempt < f.max_lr_retries
                self.log.write("divergence", phase=spec.name, stage=stage, step=e.step, lr=e.lr, loss=e.loss,
                               reason=e.reason, action="retry" if retry else "fail", attempt=attempt)
                message = f"{where} diverged at step {e.step} with lr {e.lr:g}: {e.reason}"
                if not retry:
                    tried = f" after {attempt} retr{'y' if attempt == 1 else 'ies'} at lower rates" if attempt else ""
                    raise DistillationDiverged(f"{message}{tried}; lower finetune.{spec.name}.lr (or its batch "
                                               f"size) and resume with --resume") from None
                log.warning("%s; its centroids go back to where the phase started and it runs again with lr %g",
                            message, spec.lr * f.lr_backoff)
                path.unlink(missing_ok=True)
                spec = dataclasses.replace(spec, lr=spec.lr * f.lr_backoff)
                continue
            apply_distillation(self.student, result)
            return result
        raise AssertionError("unreachable")

    def extra_params(self, phase: str, layers: list[str] | None) -> tuple[str, ...]:
        """The parameters a phase trains besides centroids (``finetune.<phase>.train_bn`` /
        ``train_bias``); FrozenBatchNorm2d layers stay frozen, with a log line."""
        cfg = self.cfg.finetune.layerwise if phase == "layerwise" else self.cfg.finetune.global_
        if not (cfg.train_bn or cfg.train_bias):
            return ()
        if cfg.train_bn and layers is not None and self.bn_after is None:
            self.bn_after = batchnorms_after(self.teacher, self.adapter.trace)
        names, frozen = trainable_parameters(self.student, layers, cfg.train_bn, cfg.train_bias, self.bn_after)
        if frozen:
            log.info("finetune.%s.train_bn: %d FrozenBatchNorm2d layer%s (%s) keep their affine parameters frozen "
                     "(they are buffers, not parameters)", "global" if phase == "global" else phase, len(frozen),
                     "" if len(frozen) == 1 else "s", ", ".join(frozen[:5]) + (", ..." if len(frozen) > 5 else ""))
        return names

    def ship_student(self) -> int:
        """Make every worker's student the driver's; returns the bytes shipped."""
        return self.executor.load_student(student_state(self.student))


@dataclass
class Stage:
    """One stage (layers that read the same input), filled in by the steps."""

    index: int
    n_stages: int
    layers: list[LayerPlan]
    dir: Path
    sizes: dict                                       # name -> LayerSize
    objectives: dict[str, Objective] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    passes: int = 0
    peak_bytes: int = 0            # statistics held by one worker at a time
    stats_bytes: int = 0           # returned to the driver by all shards
    bytes_shipped: int = 0
    fitted: dict[str, FitResult] = field(default_factory=dict)
    losses: list = field(default_factory=list)
    params: tuple[str, ...] = ()                      # other parameters its distillation trained (stage file)
    throughput: list = field(default_factory=list)   # the CollectResult of each calibration pass
    stats_file_bytes: int = 0
    holdout: dict = field(default_factory=dict)       # name -> statistics of the held-out images (quantize.holdout)
    extras: dict = field(default_factory=dict)        # name -> more fields of its ``layer`` record (rank, held-out)
    corrected: dict = field(default_factory=dict)     # name -> what bias correction did (quantize.bias_correction)

    @property
    def images_per_s(self) -> float:
        """Calibration images per second of one worker, over the stage's passes."""
        rates = [rate for part in self.throughput for rate in part.shard_rates]
        return sum(rates) / len(rates) if rates else 0.0

    @property
    def data_share(self) -> float:
        """The share of the workers' collection time spent waiting for images (reading, decoding)."""
        total = sum(part.seconds for part in self.throughput)
        return sum(part.data_seconds for part in self.throughput) / total if total > 0 else 0.0

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def file(self) -> Path:
        return self.dir / "codebooks.pt"

    @property
    def label(self) -> str:
        return f"stage {self.index + 1}/{self.n_stages}"


# -- steps before the stages -----------------------------------------------------------------------
def inspect_batchnorm(r: Run) -> None:
    """Flag the teacher's folded BatchNorm layers (running mean 0 / variance 1 on an input that is
    not normalised), which train-mode global distillation would destroy; say what the global
    phase will do with them (``finetune.global.folded_bn``)."""
    from .batchnorm import folded_batchnorms

    found = folded_batchnorms(r.teacher, r.adapter.trace)
    r.folded_bn = list(found)
    if not found:
        return
    mode = r.cfg.finetune.global_.folded_bn
    action = {"eval": "keeps them in eval mode", "unfold": "re-estimates their statistics first (unfold)",
              "train": "trains them like any BatchNorm (they will lose their function)"}[mode]
    log.warning("%d BatchNorm layer%s look%s folded (running mean 0 / variance 1 on an input that is not "
                "normalised): %s; the global distillation %s (finetune.global.folded_bn = %s)", len(found),
                "" if len(found) == 1 else "s", "s" if len(found) == 1 else "", ", ".join(found), action, mode)
    r.log.write("folded_bn", layers=found, mode=mode)
    r.report["folded_bn"] = {"layers": list(found), "mode": mode}


def allocate(r: Run) -> None:
    """``quantize.target_mb``: choose every layer's (d, K) (``allocation.json``), then save the plan.
    A plan read back on resume is kept as it is."""
    if r.planned:
        return
    q = r.cfg.quantize
    if q.target_mb is not None:
        from .allocation import allocate_plan

        with r.timers("allocate"):
            r.plan, allocation = allocate_plan(r.cfg, r.teacher, r.plan, r.executor, r.progress)
        atomic_write_text(r.out / "allocation.json", json.dumps(allocation, indent=1))
        r.log.write("allocation", target_mb=q.target_mb, compressed_mb=allocation["compressed_mb"],
                    predicted_error=allocation["predicted_error"], seconds=allocation["seconds"])
    r.plan.save(r.plan_path)
    r.manifest.record_plan(r.plan_path)


def permute_channels(r: Run) -> None:
    """``quantize.permute``: permute the teacher's channels where that keeps its function (PQF),
    each group by the permutation that lowers its quantized consumers' proxy
    (:mod:`bgd_dist.permute`), recorded in ``permutations.json``. The student is copied from the
    permuted teacher and the workers' teachers are replaced by it, so teacher and student stay
    channel-aligned. On resume (the plan read back) the file is read back."""
    from . import permute as P

    if not r.cfg.quantize.permute:
        return
    path = r.out / "permutations.json"
    with r.timers("permute"):
        record = pairs = None
        if r.planned and path.exists():
            try:
                record = json.loads(path.read_text())
                pairs = P.check_record(r.teacher, record, str(path))
            except (ValueError, KeyError, TypeError) as e:   # JSONDecodeError is a ValueError
                log.warning("%s; choosing the permutations again", e)
                r.log.write("permutations_recomputed", reason=str(e))
                record = None
        if record is None:
            record = choose_permutations(r)
            atomic_write_text(path, json.dumps(record, indent=1))
            pairs = P.check_record(r.teacher, record, str(path))
        for group, perm in pairs:
            P.apply_permutation(r.teacher, group, torch.tensor(perm))
        r.student = copy.deepcopy(r.teacher)
        shipped = r.executor.load_teacher({k: v.detach().cpu() for k, v in r.teacher.state_dict().items()})
    groups = record["groups"]
    before, after = sum(g["proxy_before"] for g in groups), sum(g["proxy_after"] for g in groups)
    for g in groups:
        r.log.write("permutation", producers=g["producers"], consumers=g["consumers"],
                    quantized_consumers=g["quantized_consumers"], channels=g["channels"],
                    identity=P.is_identity(g["perm"]), proxy_before=g["proxy_before"], proxy_after=g["proxy_after"],
                    seconds=g["seconds"])
    r.report["permutations"] = {"file": path.name, "groups": len(groups),
                                "permuted": sum(not P.is_identity(g["perm"]) for g in groups),
                                "proxy_before": before, "proxy_after": after, "teacher_bytes_shipped": shipped}
    log.info("channel permutations: %d groups (%d permuted), proxy %.2f -> %.2f; %s", len(groups),
             r.report["permutations"]["permuted"], before, after, path)


def choose_permutations(r: Run) -> dict:
    """The ``permutations.json`` record of the teacher: its permutable groups under the plan and,
    for each, the permutation chosen with the calibration images' input scales of its consumers
    (none for the ``weights`` objective)."""
    from . import permute as P

    q = r.cfg.quantize
    kept, left = P.plan_groups(r.teacher, r.plan, r.adapter.trace)
    aware = list(dict.fromkeys(n for _, sens in kept for n, _ in sens if r.plan.layer(n).objective != "weights"))
    scales = {}
    if aware:
        r.ship_student()   # still the teacher's copy
        requests = tuple(LayerRequest(n, r.plan.layer(n).geometry, 1, "input_moments") for n in aware)
        stats = r.executor.collect(CollectRequest(requests, q.n_calibration, q.batch_size, r.seeds.permute())).stats
        for name, moments in stats.items():
            moments.check()
            scales[name] = (moments.squares / moments.count).sqrt()
    modules = dict(r.teacher.named_modules())
    groups = []
    for group, sens in kept:
        weights = [(modules[n].weight, r.plan.layer(n).geometry.kind, k) for n, k in sens]
        choice = P.choose_permutation(weights, [scales.get(n) for n, _ in sens])
        groups.append({**group.to_dict(), "quantized_consumers": [n for n, _ in sens], "perm": choice.perm,
                       "proxy_before": choice.proxy_before, "proxy_after": choice.proxy_after,
                       "passes": choice.passes, "seconds": choice.seconds})
    return {"version": P.PERMUTATIONS_VERSION, "groups": groups, "left_alone": left}


def evaluate(executor: Executor, adapter, which: str, max_images: int | None,
             results_path: str | Path | None = None, progress: bool = False) -> dict:
    """Evaluate the workers' teacher or student on every shard, merge, score once; the
    evaluator also writes its predictions to ``results_path`` if it has any to write (COCO)."""
    evaluator = adapter.evaluator()
    with progress_bar(executor.num_shards, f"eval {which}", "shard", progress) as bar:
        evaluator.merge(executor.evaluate(which, max_images, progress=bar.update))
    metrics = evaluator.result()
    if results_path is not None:
        evaluator.write_results(results_path)
    return metrics


def evaluate_model(r: Run, which: str) -> dict:
    """Evaluate the teacher, or the student as the exported ``model.bgd`` loads (so a file that
    does not load can never be reported as a success)."""
    with r.timers("eval"):
        if which == "student":
            from .fileformat import load_compressed

            r.executor.load_student(student_state(load_compressed(r.out / "model.bgd",
                                                                  model=r.adapter.fresh_model())))
        metrics = evaluate(r.executor, r.adapter, which, r.cfg.eval.max_images, r.out / f"detections_{which}.json",
                           r.progress)
    log.info("%s: %s", which, metrics)
    r.log.write("eval", model=which, metrics=metrics)
    return metrics


# -- the steps of one stage ------------------------------------------------------------------------
def replay(r: Run, st: Stage) -> bool:
    """A finished stage: swap in its saved, fine-tuned codebooks. A stage file that fails its
    checksum or cannot be read is reported and the stage computed again (it is deterministic):
    returns False then."""
    problem = r.manifest.stage_problem(st.index)
    if problem is None:
        try:
            saved = load_stage(st.file, st.names)
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        log.warning("%s: %s; computing the stage again", st.label, problem)
        r.log.write("stage_recomputed", stage=st.index, reason=problem)
        return False
    quantize_(r.student, r.plan, codebooks_from(saved, st.names))
    restore_tensors(r.student, corrected_from(saved), st.file)
    if saved.get("params"):   # BN affine parameters / biases its distillation trained
        own = dict(r.student.named_parameters())
        with torch.no_grad():
            for name, value in saved["params"].items():
                own[name].copy_(value)
    r.quantized_bytes += sum(size.nbytes for size in st.sizes.values())
    log.info("%s %s: replayed from %s", st.label, st.names, st.file)
    return True


def collect(r: Run, st: Stage) -> None:
    """a. Statistics of the stage's layers on the current student (earlier stages quantized and
    fine-tuned), in as many calibration passes as ``hessian.max_mb`` needs."""
    q = r.cfg.quantize
    with r.timers("collect"):
        st.bytes_shipped = r.ship_student()
        for l in st.layers:
            st.objectives[l.name], why = resolve(l, q.hessian)
            if why is not None:
                fallback = st.objectives[l.name].name
                log.warning("%s %s: %s; using the %s for this layer", st.label, l.name, why,
                            "pooled Gram (paper objective)" if fallback == "paper" else f"{fallback} objective")
                r.log.write(f"{l.objective}_fallback", stage=st.index, layer=l.name, reason=why)
        requests = [LayerRequest(l.name, l.geometry, l.block_size, stats_kind(l.name, st.objectives[l.name], q.hessian))
                    for l in st.layers]
        if not any(o.needs_calibration for o in st.objectives.values()):
            return
        passes = collect_groups(requests, q.hessian.max_mb * MB)
        # teacher forcing only in the passes whose statistics pair the student's rows with the teacher's
        force = q.teacher_forcing if any(getattr(STATS_TYPES[rq.stats], "needs_teacher", False)
                                         for rq in requests) else ""
        with progress_bar(q.n_calibration * len(passes), f"collect {st.index}", "img", r.progress,
                          leave=False) as bar:
            for group in passes:   # several passes only when the stage's Hessians exceed max_mb
                part = r.executor.collect(CollectRequest(group, q.n_fit, q.batch_size, r.seeds.collect(st.index),
                                                         force=force), progress=bar.update)
                st.peak_bytes = max(st.peak_bytes, part.nbytes)
                st.stats.update(part.stats)
                st.throughput.append(part)
                if q.n_holdout:   # the same statistics on the held-out images (the stream's next positions)
                    held = r.executor.collect(CollectRequest(group, q.n_holdout, q.batch_size, r.seeds.collect(st.index),
                                                             start=q.n_fit, force=force), progress=bar.update)
                    st.holdout.update(held.stats)
        st.stats_file_bytes = save_stage_stats(st.dir / "stats.pt", st.stats, q.keep_stats)
        st.passes = len(passes)
        st.stats_bytes = sum(s.nbytes for s in st.stats.values()) * r.executor.num_shards
        log.info("%s statistics (%s, %d calibration pass%s): %.3f MB per worker, %.3f MB returned to the driver; "
                 "%.1f images/s per worker, %.0f%% of it waiting for images", st.label,
                 ", ".join(sorted({o.stats for o in st.objectives.values()})), st.passes,
                 "" if st.passes == 1 else "es", st.peak_bytes / MB, st.stats_bytes / MB, st.images_per_s,
                 100 * st.data_share)


def fit(r: Run, st: Stage) -> None:
    """b. One codebook per layer (executor tasks)."""
    q = r.cfg.quantize
    settings = FitSettings.of(q)
    with r.timers("fit"):
        jobs = []
        for l in st.layers:
            metric = None
            if st.objectives[l.name].needs_calibration:
                st.stats[l.name].check()
                metric = st.stats[l.name].metric()
            weight = get_submodule(r.student, l.name).weight.detach().cpu()
            weight = teacher_target(r, st, l, weight)
            jobs.append(FitJob(l.name, weight, l.geometry, metric, l.n_centroids, l.block_size,
                               seed=r.seeds.fit(l), objective=st.objectives[l.name].name, settings=settings))
        with progress_bar(len(jobs), f"fit {st.index}", "layer", r.progress, leave=False) as bar:
            st.fitted = r.executor.fit(jobs, progress=lambda result: bar.update())
        for job in jobs:
            st.extras[job.name] = layer_diagnostics(r, st, job)


def stats_kind(name: str, obj, hessian_cfg) -> str:
    """The statistics layer ``name`` fitted under ``obj`` collects: the objective's own, or for the
    ``hessian`` objective with ``hessian.target: teacher`` (and ``name`` matching
    ``hessian.teacher_match``) the teacher-paired ones."""
    if obj.stats == "hessian" and hessian_cfg.target == "teacher" and re.fullmatch(hessian_cfg.teacher_match, name):
        return "hessian_teacher"
    return obj.stats


def teacher_target(r: Run, st: Stage, l, weight):
    """The weight the layer's fit reproduces: ``weight`` itself, or with ``hessian.target:
    teacher`` the target ``W*`` of :class:`~bgd_dist.core.stats.TeacherTargetStats` (the fit
    then reproduces the teacher's outputs from the student's inputs). A layer whose inputs
    could not be paired with the teacher's, or whose relative input error exceeds
    ``hessian.max_input_error``, keeps ``weight`` (logged; the layers ``hessian.teacher_match``
    leaves out never collect the paired statistics, :func:`stats_kind`). ``hessian.target_damp:
    auto`` chooses the ridge of ``W*`` on the held-out images' paired statistics, ``W`` included."""
    from .core.layouts import weight_from_matrix, weight_matrix

    stats = st.stats.get(l.name)
    if not getattr(stats, "needs_teacher", False):
        return weight
    h = r.cfg.quantize.hessian
    err = stats.input_error
    extra = st.extras.setdefault(l.name, {})
    extra["input_error"] = err
    why = None
    if err is None:
        why = "its inputs do not pair with the teacher's (different calls or shapes)"
    elif err > h.max_input_error:
        why = f"its relative input error {err:.3f} exceeds quantize.hessian.max_input_error = {h.max_input_error:g}"
    if why is not None:
        log.warning("%s %s: fitted to its own weights, not the teacher's outputs: %s", st.label, l.name, why)
        extra["target"] = "weights"
        return weight
    w = weight_matrix(weight, l.geometry).double()
    held = st.holdout.get(l.name)
    if h.target_damp == "auto" and getattr(held, "aligned", False) and held.n_rows:
        damp, target = stats.select_target(w, held)
        extra["target_damp"] = damp
        if damp is None:   # no W* reproduces the teacher's outputs on the held-out images better than W
            extra["target"] = "weights"
            return weight
    else:
        damp = h.target_damp if h.target_damp not in (None, "auto") else layer_damp(h.damp, stats.metric())
        target = stats.target_weight(w, damp)
    extra["target"] = "teacher"
    extra["target_damp"] = damp
    extra["target_shift"] = float((target - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-300))
    return weight_from_matrix(target.to(weight.dtype), l.geometry)


def layer_diagnostics(r: Run, st: Stage, job: FitJob) -> dict:
    """More fields of a layer's ``layer`` record: the effective rank of its Gram / Hessian
    (``rank`` of ``dim``; warned when deficient), the damping ``hessian.damp: auto`` chose, and
    the fitted codebook's relative objective on the held-out images (``objective_holdout``)."""
    from .core.hessian import RANK_RTOL, auto_damp, effective_rank

    out = dict(st.extras.get(job.name, {}))
    stats = st.stats.get(job.name)
    kind = getattr(stats, "name", None)
    if kind in ("gram", "hessian", "hessian_teacher"):
        dim = stats.matrix.shape[0]
        rank = effective_rank(stats.matrix, RANK_RTOL)
        out.update(rank=rank, dim=dim)
        if rank < dim:
            rows = stats.n_rows if kind == "gram" else stats.n_inputs
            log.warning("%s %s: rank %d of %d from %d input rows (%s statistics; eigenvalues above %g x the "
                        "largest); the objective does not constrain the weights in the other directions",
                        st.label, job.name, rank, dim, rows, kind, RANK_RTOL)
        if job.objective == "hessian" and job.settings.hessian_damp == "auto":
            out["damp"] = auto_damp(rank, dim)
    if job.name in st.holdout:
        out["objective_holdout"] = relative_objective(job.objective, job.weight, job.geometry,
                                                      st.fitted[job.name].codebook, st.holdout[job.name])
    return out


def swap(r: Run, st: Stage) -> None:
    """c. Swap the stage's layers for quantized ones."""
    quantize_(r.student, r.plan, {n: f.codebook for n, f in st.fitted.items()})
    for l in st.layers:
        f, size = st.fitted[l.name], st.sizes[l.name]
        r.quantized_bytes += size.nbytes
        obj, name = f.codebook.objective, st.objectives[l.name].name
        extra = dict(st.extras.get(l.name, {}))
        if f.restart_objectives:
            extra["restart_objectives"] = list(f.restart_objectives)
        held = "" if extra.get("objective_holdout") is None else f" (held-out {extra['objective_holdout']:.4f})"
        if extra.get("target") == "teacher":
            held += f" to the teacher's outputs (input error {extra['input_error']:.4f}, damp {extra['target_damp']:g})"
        if f.restart_objectives:
            held += f" (best of {len(f.restart_objectives)} restarts, worst {max(f.restart_objectives):.4f})"
        log.info("%s %s: d=%d K=%d %.3f bits/w %s objective %.4f -> %.4f%s fit %.2fs | quantized so far %.3f MB",
                 st.label, l.name, l.block_size, l.n_centroids, size.bits_per_weight, name, obj[0], obj[-1], held,
                 f.seconds, r.quantized_bytes / MB)
        r.log.write("layer", stage=st.index, layer=l.name, block_size=l.block_size, n_centroids=l.n_centroids,
                    objective=name, bits_per_weight=size.bits_per_weight, objective_start=obj[0],
                    objective_end=obj[-1], fit_seconds=f.seconds, quantized_mb_so_far=r.quantized_bytes / MB,
                    n_empty_repaired=f.codebook.n_empty_repaired, **extra)


def correct_bias(r: Run, st: Stage) -> None:
    """c'. ``quantize.bias_correction``: run the teacher and the swapped student on the stage's
    calibration images (the fitted ones, same shards and seed as :func:`collect`), and remove the
    difference of every layer's per-channel output mean, ``δ = mean_teacher - mean_student``:
    into the layer's own bias, else into the β of the BatchNorm that reads its output
    (``β += γ / sqrt(running_var + eps) · δ``; running statistics are never re-estimated, so a
    folded BatchNorm keeps its 0 / 1). A layer with neither is left as it is (logged)."""
    from .batchnorm import batchnorm_consumers

    q = r.cfg.quantize
    if not q.bias_correction:
        return
    with r.timers("bias_correction"):
        r.ship_student()
        request = OutputMomentsRequest(st.names, q.n_fit, q.batch_size, r.seeds.collect(st.index),
                                       force=q.teacher_forcing)
        with progress_bar(q.n_fit, f"bias {st.index}", "img", r.progress, leave=False) as bar:
            moments = r.executor.output_moments(request, progress=bar.update)
        consumers = batchnorm_consumers(r.teacher, r.adapter.trace, st.names)
        for name in st.names:
            mean_t, var_t = moments.teacher[name].mean_var()
            mean_s, _ = moments.student[name].mean_var()
            delta = mean_t - mean_s
            relative = delta.abs() / var_t.sqrt().clamp_min(1e-12)
            layer = get_submodule(r.student, name)
            with torch.no_grad():
                if layer.bias is not None:
                    into, tensor = "bias", f"{name}.bias"
                    layer.bias.add_(delta.to(layer.bias))
                elif name in consumers:
                    bn = get_submodule(r.student, consumers[name])
                    into, tensor = consumers[name], f"{consumers[name]}.bias"
                    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
                    bn.bias.add_((scale * delta.to(scale)).to(bn.bias))
                else:
                    into, tensor = None, None
            st.corrected[name] = {"into": into, "tensor": tensor, "max_relative": float(relative.max()),
                                  "mean_relative": float(relative.mean())}
            if into is None:
                log.warning("%s %s: no bias correction (the layer has no bias and no BatchNorm reads its output); "
                            "output mean shift max %.3g / mean %.3g channel std", st.label, name,
                            relative.max(), relative.mean())
            else:
                log.info("%s %s: bias correction into %s: output mean shift max %.3g / mean %.3g channel std",
                         st.label, name, "its bias" if into == "bias" else f"the beta of {into}",
                         relative.max(), relative.mean())
            r.log.write("bias_correction", stage=st.index, layer=name, into=into, tensor=tensor,
                        max_relative_shift=float(relative.max()), mean_relative_shift=float(relative.mean()),
                        n_images=moments.n_images)


def restore_tensors(student: nn.Module, tensors: dict, source: Path | str = "<stage file>") -> None:
    """Copy saved tensors (dotted state-dict names, see :func:`~bgd_dist.rundir.save_stage`) into
    ``student``: a replayed stage's bias corrections."""
    state = student.state_dict()
    missing = [k for k in tensors if k not in state]
    if missing:
        raise ValueError(f"{source}: holds tensors the student lacks: {missing}")
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)


def distill_stage(r: Run, st: Stage) -> None:
    """d. Layer-wise distillation of the stage's centroids."""
    cfg = r.cfg.finetune.layerwise
    if not (cfg.enabled and cfg.iterations > 0):
        return
    # reuse_teacher: every stage draws stage 0's batch stream, so the teacher's outputs can be reused
    seed = r.seeds.layerwise(0 if cfg.reuse_teacher else st.index)
    st.params = r.extra_params("layerwise", st.names)
    with r.timers("layerwise"):
        result = r.distill(layerwise_spec(cfg, st.names, seed=seed, params=st.params), st.index)
    st.losses = result.losses
    log.info("%s layer-wise distillation: %d it, loss %.4f -> %.4f", st.label, len(st.losses), st.losses[0],
             st.losses[-1])


def checkpoint(r: Run, st: Stage) -> None:
    """e. Write the stage's codebooks durably, then mark it done."""
    save_stage(st.file, r.student, st.names, st.params,
               [c["tensor"] for c in st.corrected.values() if c["tensor"]])
    r.manifest.mark(st.index, files=[st.file], layers=st.names, bytes_shipped=st.bytes_shipped)
    info = {"stage": st.index, "layers": st.names, "bytes_shipped": st.bytes_shipped,
            "stats_bytes_returned": st.stats_bytes, "stats_memory_bytes": st.peak_bytes, "stats_passes": st.passes,
            "stats_kinds": sorted({o.stats for o in st.objectives.values()}),
            "stats_file_bytes": st.stats_file_bytes,
            "collect_images_per_s_per_worker": round(st.images_per_s, 3) if st.throughput else None,
            "collect_data_share": round(st.data_share, 4) if st.throughput else None,
            "loss_start": st.losses[0] if st.losses else None, "loss_end": st.losses[-1] if st.losses else None}
    if st.corrected:
        info["bias_correction"] = {n: {k: v for k, v in c.items() if k != "tensor"} for n, c in st.corrected.items()}
    if st.holdout:
        info["objective"] = {n: f.codebook.objective[-1] for n, f in st.fitted.items()}
        info["objective_holdout"] = {n: st.extras.get(n, {}).get("objective_holdout") for n in st.fitted}
    r.report["stages"].append(info)
    r.log.write("stage", **info)
    (st.dir / "distill.pt").unlink(missing_ok=True)   # the stage file now holds the distilled codebooks


# -- the steps after the stages --------------------------------------------------------------------
def global_distillation(r: Run) -> None:
    """Distillation of every centroid together (BN statistics update)."""
    cfg = r.cfg.finetune.global_
    if not (cfg.enabled and cfg.epochs * cfg.iterations_per_epoch):
        return
    keep_eval = r.folded_bn if cfg.folded_bn == "eval" else []
    with r.timers("global"):
        if r.folded_bn and cfg.folded_bn == "unfold":
            unfold_folded_batchnorms(r)
        result = r.distill(global_spec(cfg, seed=r.seeds.global_(), eval_modules=keep_eval,
                                       params=r.extra_params("global", None)))
    log.info("global distillation: %d it, loss %.4f -> %.4f", len(result.losses), result.losses[0],
             result.losses[-1])
    r.log.write("global", losses_start=result.losses[0], losses_end=result.losses[-1],
                iterations=len(result.losses))


def unfold_folded_batchnorms(r: Run) -> None:
    """Re-estimate the folded BatchNorm layers' running statistics on the calibration images (the
    workers' per-channel input moments on the current student) and rescale their affine
    parameters so that each layer's eval-mode output is unchanged (checked on inputs drawn with
    the measured moments)."""
    from .batchnorm import unfold_batchnorm

    q = r.cfg.quantize
    r.ship_student()
    requests = tuple(LayerRequest(n, None, 1, "channel_moments") for n in r.folded_bn)
    moments = r.executor.collect(CollectRequest(requests, q.n_calibration, q.batch_size, r.seeds.unfold())).stats
    worst = 0.0
    for name in r.folded_bn:
        bn = get_submodule(r.student, name)
        before = copy.deepcopy(bn).eval()
        mean, var = moments[name].mean_var()
        unfold_batchnorm(bn, mean, var)
        per_channel = (1, -1) + (1,) * _spatial_dims(bn)
        noise = torch.randn((8, len(mean)) + (4,) * _spatial_dims(bn), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
        x = (noise * var.sqrt().view(per_channel) + mean.view(per_channel)).to(bn.weight.dtype)
        with torch.no_grad():
            expected, got = before(x), bn.eval()(x)
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        if error > 1e-4:
            raise RuntimeError(f"unfolding BatchNorm {name!r} changed its eval-mode output (relative error "
                               f"{error:.2e}); set finetune.global.folded_bn=eval")
        worst = max(worst, error)
    log.info("unfolded %d BatchNorm layer%s on %d calibration images (eval-mode outputs unchanged, largest "
             "relative difference %.1e)", len(r.folded_bn), "" if len(r.folded_bn) == 1 else "s", q.n_calibration,
             worst)
    r.log.write("unfold_bn", layers=r.folded_bn, max_relative_error=worst)


def _spatial_dims(bn: nn.Module) -> int:
    """How many spatial dimensions a BatchNorm's input has (BatchNorm1d: 0, 2d: 2, 3d: 3)."""
    return {"BatchNorm1d": 0, "BatchNorm2d": 2, "BatchNorm3d": 3}.get(type(bn).__name__, 2)


def export(r: Run) -> None:
    """``model.bgd``. The file stores fp16 centroids: the student is rounded first, so the metrics
    measured after are the file's."""
    from .export import deployment_metadata
    from .fileformat import save_compressed

    round_centroids_fp16(r.student)
    with r.timers("export"):
        sizes = size_report(r.student, r.plan)
        save_compressed(r.out / "model.bgd", r.student, r.plan, r.adapter.arch(),
                        metadata={"name": r.cfg.name, "compressed_mb": sizes.compressed_mb,
                                  **deployment_metadata(r.cfg, r.adapter)})


def write_report(r: Run) -> dict:
    if r.metrics_after is not None:   # the file records what it scores (measured on the file itself)
        from .fileformat import update_metadata

        update_metadata(r.out / "model.bgd", {"metrics": {"teacher": r.metrics_before,
                                                          "compressed": r.metrics_after}})
    uncompressed, sizes = size_report(r.teacher, r.plan), size_report(r.student, r.plan)
    r.report.update({
        "uncompressed_mb": uncompressed.uncompressed_mb, "compressed_mb": sizes.compressed_mb,
        "ratio": sizes.ratio, "file_bytes": (r.out / "model.bgd").stat().st_size,
        "metrics_before": r.metrics_before, "metrics_after": r.metrics_after,
        "skipped_images": len(r.skipped_items), "seconds": r.timers.total(), "numerics": numerics(),
        "run_dir_bytes": directory_bytes(r.out),   # before report.json and the final figure
    })
    if r.skipped_items:
        log.warning("%d unreadable input files were left out (data.on_bad_image: skip); log.jsonl lists them",
                    len(r.skipped_items))
        r.log.write("skipped_images", files=r.skipped_items)
    atomic_write_text(r.out / "report.json", json.dumps(r.report, indent=1, default=float))
    r.log.write("report", **r.report)
    r.plot.refresh(force=True)
    return r.report


# -- the run ---------------------------------------------------------------------------------------
def make_executor(cfg: PipelineConfig, kind: str | None = None, address: str | None = None) -> Executor:
    e = cfg.executor
    kind = kind or e.kind
    if kind == "serial":
        return SerialExecutor(num_shards=e.num_workers, threads=e.threads_per_worker)
    from .distributed.ray_executor import RayExecutor

    return RayExecutor(num_workers=e.num_workers, address=address or e.address, num_cpus=e.num_cpus,
                       num_gpus_per_worker=e.num_gpus_per_worker, threads_per_worker=e.threads_per_worker or 1,
                       max_in_flight=e.max_fit_tasks,
                       actor_resources=e.actor_resources, schedule_timeout_s=e.schedule_timeout_s,
                       start_timeout_s=e.start_timeout_s)


def run(cfg: PipelineConfig, out_dir: str | Path, executor: Executor | None = None, resume: bool = False,
        do_eval: bool = True, fail_after_stage: int | None = None, progress: bool = True, adapter=None) -> dict:
    """Compress ``cfg``'s model into ``out_dir/model.bgd``; returns the report (also ``report.json``).

    ``adapter``: an adapter instance holding its model and data (:func:`bgd_dist.compress`); it
    goes to the workers by value. Default: the adapter ``cfg.model`` names, which every worker
    builds from the model and data sections (``bgd quantize``). Both take this one path.
    The run holds an exclusive lock on ``out_dir`` throughout (:class:`~bgd_dist.runlock.RunLock`)."""
    if adapter is None:   # every required (???) setting at once, before any model is built
        require_all(cfg, ignore=lambda key: not do_eval and key.startswith("data.val"))
    with RunLock(out_dir):
        return _run(cfg, out_dir, executor, resume, do_eval, fail_after_stage, progress, adapter)


def _run(cfg, out_dir, executor, resume, do_eval, fail_after_stage, progress, adapter=None) -> dict:
    r = Run.open(cfg, out_dir, resume, progress, adapter)
    own_executor = executor is None
    r.executor = executor or make_executor(cfg)
    try:
        if adapter is not None:
            r.executor.start(adapter, None)
        else:
            r.executor.start(cfg.model, cfg.data)
        allocate(r)
        permute_channels(r)
        inspect_batchnorm(r)
        if do_eval:
            r.metrics_before = evaluate_model(r, "teacher")
        for st in r.stages():
            if r.manifest.done(st.index) and replay(r, st):
                continue
            collect(r, st)
            fit(r, st)
            swap(r, st)
            correct_bias(r, st)
            distill_stage(r, st)
            checkpoint(r, st)
            if fail_after_stage is not None and st.index == fail_after_stage:
                raise InjectedFailure(f"injected failure after stage {st.index}")
        global_distillation(r)
        export(r)
        if do_eval:
            r.metrics_after = evaluate_model(r, "student")
        r.skipped_items = r.executor.skipped_items()
    finally:
        if own_executor:
            r.executor.close()
    return write_report(r)


def numerics() -> dict:
    """What the float results depend on besides the configuration: the same pipeline writes the same
    bytes for the same torch version, CPU vector instruction set and thread settings, and rounds
    differently on another CPU type (e.g. AVX2 vs AVX-512 kernels)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "driver_threads": torch.get_num_threads()}


def round_centroids_fp16(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in pq_layers(model).values():
            layer.centroids.copy_(layer.centroids.half().to(layer.centroids.dtype))


def apply_distillation(student: nn.Module, result: PhaseState) -> None:
    """Copy a distillation result's centroids, the extra parameters it trained (BN affine, biases)
    and, after the global phase, rank 0's BN buffers into the driver's student."""
    layers = pq_layers(student)
    with torch.no_grad():
        for name, c in result.centroids.items():
            layers[name].centroids.copy_(c)
        if result.params:
            own = dict(student.named_parameters())
            for name, value in result.params.items():
                own[name].copy_(value)
        if result.buffers:
            buffers = dict(student.named_buffers())
            for k, v in result.buffers[0].items():
                buffers[k].copy_(v)
