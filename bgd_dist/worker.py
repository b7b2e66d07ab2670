"""One process's work: statistics of a data shard, a share of distillation, one codebook fit.

Plain Python and torch: the serial executor calls it in-process, the Ray
executor wraps it in an actor (``bgd_dist/distributed``). Everything passed in
or returned is plain data (the dataclasses of :mod:`bgd_dist.messages`).
"""

from __future__ import annotations

import datetime
import re
import time
from collections import deque
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from .adapters import make_adapter
from .core.stats import ChannelMoments, make_stats
from .finetune import MB, PhaseSpec, PhaseState, TeacherCache, distill
from .messages import CollectRequest, FitJob, FitResult, OutputMomentsRequest, ShardOutputMoments, ShardStats
from .nn.modules import get_submodule
from .objectives import objective
from .seeds import restart_seed
from .student import load_student

__all__ = ["FitJob", "Worker", "run_fit"]


def run_fit(job: FitJob) -> FitResult:
    """Fit one codebook under the job's objective (:mod:`bgd_dist.objectives`); returns it with
    the seconds it took. With ``settings.restarts`` > 1 the fit runs from that many k-means
    initialisations (:func:`bgd_dist.seeds.restart_seed`) and keeps the codebook with the lowest
    final objective (the first on a tie). Errors name the layer."""
    start = time.perf_counter()
    fit = objective(job.objective).fit
    best, finals = None, []
    try:
        for restart in range(job.settings.restarts):
            codebook = fit(replace(job, seed=restart_seed(job.seed, restart)))
            finals.append(float(codebook.objective[-1]))
            if best is None or finals[-1] < best.objective[-1]:
                best = codebook
    except Exception as e:
        raise RuntimeError(f"codebook fit failed for layer {job.name!r}: {e}") from e
    return FitResult(job.name, best, time.perf_counter() - start, tuple(finals) if len(finals) > 1 else ())


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Worker:
    """A model replica plus the adapter's data, for one shard at a time.

    Built from ``(model_config, data_config)`` (the adapter the config names is built here), or
    from an adapter instance that holds its model and data (passed by value; ``data_config`` None)."""

    group_backend: str | None = None   # the executor sets gloo when ranks share a GPU (NCCL refuses that)

    def __init__(self, model_config, data_config: dict | None = None, device: str | None = None,
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device) if device else _device()
        self.adapter = make_adapter(model_config, data_config)
        self._teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.rank, self.world = 0, 1
        self._stream = None   # (phase key, next step, iterator) of the distillation stream in progress
        self.teacher_cache: TeacherCache | None = None   # layer-wise teacher outputs (finetune.layerwise.reuse_teacher)

    @property
    def teacher(self) -> nn.Module:
        """The adapter's model, built on first use: evaluating a compressed file needs none."""
        if self._teacher is None:
            self._teacher = self.adapter.build_model().to(self.device).eval()
        return self._teacher

    def ping(self) -> bool:
        return True

    def load_teacher(self, state: dict) -> None:
        """Load ``state`` into the teacher (the driver's teacher after a function-preserving change)."""
        self.teacher.load_state_dict(state, strict=True)

    # -- student ------------------------------------------------------------------------------
    def load_student(self, payload: dict) -> None:
        self.student = load_student(self.teacher, payload).to(self.device).eval()

    def load_compressed(self, path: str) -> None:
        """Make a compressed file the student (the path must be readable on this node)."""
        from .fileformat import load_compressed

        self.student = load_compressed(path, model=self.adapter.fresh_model()).to(self.device).eval()

    # -- statistics ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, request: CollectRequest, shard: int, n_shards: int) -> ShardStats:
        """The statistics ``request`` asks for, over this shard of its calibration images."""
        if self.student is None:
            raise RuntimeError("collect called before load_student")
        start = time.perf_counter()
        stats = {l.name: make_stats(l.stats, l.geometry, l.block_size, l.name) for l in request.layers}
        # statistics that pair the student's input with the teacher's (quantize.hessian.target: teacher): the
        # teacher runs first on the same batch, and its inputs wait here, call by call, for the student's
        paired = {name: deque() for name, s in stats.items() if getattr(s, "needs_teacher", False)}
        handles = []
        for name in stats:
            module = get_submodule(self.student, name)
            if name in paired:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, s=stats[name], q=paired[name]: s.update_pair(args[0], q.popleft() if q else None)))
                handles.append(get_submodule(self.teacher, name).register_forward_pre_hook(
                    lambda m, args, q=paired[name]: q.append(args[0])))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, args, s=stats[name]: s.update(args[0])))
        forcing = TeacherForcing(self.teacher, self.student, request.force)
        teacher = bool(paired) or bool(forcing)
        seen, waiting = 0, 0.0
        try:
            self.student.eval()
            if teacher:
                self.teacher.eval()
            batches = iter(self._calibration(request, shard, n_shards))
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                waiting += time.perf_counter() - t   # reading and decoding images (or a DataLoader's queue)
                if batch is None:
                    break
                batch = self.adapter.to_device(batch, self.device)
                if teacher:
                    self.adapter.forward(self.teacher, batch)
                self.adapter.forward(self.student, batch)
                forcing.end_batch()
                for name, q in paired.items():   # teacher calls the student did not make: rows do not pair
                    if q:
                        stats[name].aligned = False
                        q.clear()
                seen += self.adapter.batch_len(batch)
        finally:
            for h in handles:
                h.remove()
            forcing.remove()
        return ShardStats({n: s.state() for n, s in stats.items()}, seen, time.perf_counter() - start, waiting)

    def _calibration(self, request, shard: int, n_shards: int):
        """This shard's calibration batches of ``request`` (from stream position ``request.start``)."""
        start = getattr(request, "start", 0)
        if not start:   # adapters without the ``start`` keyword serve every run without a holdout
            return self.adapter.calibration_batches(shard, n_shards, request.n_images, request.batch_size,
                                                    request.seed)
        try:
            return self.adapter.calibration_batches(shard, n_shards, request.n_images, request.batch_size,
                                                    request.seed, start=start)
        except TypeError as e:
            raise TypeError(f"{type(self.adapter).__name__}.calibration_batches does not take start= (held-out "
                            f"calibration images, quantize.holdout): {e}") from None

    @torch.no_grad()
    def output_moments(self, request: OutputMomentsRequest, shard: int, n_shards: int) -> ShardOutputMoments:
        """Per-channel moments of the outputs of ``request.layers`` on the teacher and on the
        current student, both run on this shard's calibration images (bias correction)."""
        if self.student is None:
            raise RuntimeError("output_moments called before load_student")
        start = time.perf_counter()
        moments = {which: {n: ChannelMoments.empty(layer=n) for n in request.layers} for which in ("teacher", "student")}
        handles = []
        models = {"teacher": self.teacher, "student": self.student}
        for which, model in models.items():
            for name in request.layers:
                module = get_submodule(model, name)
                handles.append(module.register_forward_hook(
                    lambda m, args, out, s=moments[which][name]: s.update(out)))
        # after the moments' hooks, so that they see the student's own output
        forcing = TeacherForcing(self.teacher, self.student, request.force)
        seen = 0
        try:
            for model in models.values():
                model.eval()
            for batch in self._calibration(request, shard, n_shards):
                batch = self.adapter.to_device(batch, self.device)
                self.adapter.forward(self.teacher, batch)
                self.adapter.forward(self.student, batch)
                forcing.end_batch()
                seen += self.adapter.batch_len(batch)
        finally:
            for h in handles:
                h.remove()
            forcing.remove()
        return ShardOutputMoments({n: m.state() for n, m in moments["teacher"].items()},
                                  {n: m.state() for n, m in moments["student"].items()}, seen,
                                  time.perf_counter() - start)

    def skipped_items(self) -> list[str]:
        """The input files this worker's adapter left out as unreadable (``data.on_bad_image: skip``)."""
        return self.adapter.skipped_items()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, which: str, shard: int, n_shards: int, max_images: int | None):
        """The adapter evaluator's ``state()`` for this shard of the evaluation data."""
        model = self.teacher if which == "teacher" else self.student
        if model is None:
            raise RuntimeError("evaluate('student') called before load_student")
        model.eval()
        evaluator = self.adapter.evaluator()
        evaluator.reset()
        for batch in self.adapter.eval_batches(shard, n_shards, max_images):
            evaluator.process(batch, self.adapter.predict(model, self.adapter.to_device(batch, self.device)))
        return evaluator.state()

    # -- distillation -------------------------------------------------------------------------
    def setup_group(self, init_method: str, rank: int, world: int, timeout_s: float = 600.0) -> None:
        """Join a torch.distributed group (gloo on CPU, nccl on GPU) for data-parallel distillation."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        backend = self.group_backend or ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world

    def _reduce_grads(self, grads: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def distill(self, spec: PhaseSpec, rank: int = 0, world: int = 1, state: PhaseState | None = None,
                stop: int | None = None, progress: Callable[[int, float], None] | None = None) -> PhaseState:
        """This worker's share of steps ``state.step`` (0) to ``stop`` (the end) of a distillation
        phase. Step k's batch is a function of (seed, k) alone, so the phase can be run in pieces,
        and resumed from any piece's state, with the same result. Returns the state after
        ``stop`` with this worker's BN buffers and local losses (the executor combines ranks)."""
        if self.student is None:
            raise RuntimeError("distill called before load_student")
        if spec.batch_size % world:
            raise ValueError(f"{spec.name} distillation: batch size {spec.batch_size} is not divisible by "
                             f"{world} workers")
        if world > 1 and (self.world != world or self.rank != rank):
            raise RuntimeError(f"worker expected in a group of {world} as rank {rank}; call setup_group first")
        start = state.step if state is not None else 0
        stop = spec.iterations if stop is None else min(stop, spec.iterations)
        # the training stream continues from the previous piece when it ended where this one starts
        # (no loader restart per checkpoint); otherwise it starts at ``start`` (same batches either way)
        key = (spec.name, spec.layers, spec.seed, spec.batch_size, rank, world)
        if self._stream is not None and self._stream[:2] == (key, start):
            batches = self._stream[2]
        else:
            batches = iter(self.adapter.train_batches(rank, world, spec.batch_size // world, spec.seed,
                                                      start_step=start))
        self._stream = None   # a piece that fails leaves the stream at an unknown step
        device_batches = (self.adapter.to_device(b, self.device) for b in batches)
        targets = None
        if spec.teacher_cache_mb > 0:   # the same stream in every phase that asks: keep the teacher's outputs
            if self.teacher_cache is None:
                self.teacher_cache = TeacherCache()
            self.teacher_cache.bind((spec.seed, spec.batch_size, rank, world), spec.teacher_cache_mb * MB)
            targets = self.teacher_cache.get
        else:
            self.teacher_cache = None   # e.g. the global phase: free the memory
        result = distill(self.student, self.teacher, self.adapter, spec, device_batches,
                         self._reduce_grads if world > 1 else None, progress, state, stop, rank, targets)
        self._stream = (key, stop, batches) if stop < spec.iterations else None
        return result


def forced_modules(pattern: str, model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s modules that ``quantize.teacher_forcing`` (``pattern``) fully
    matches; none for an empty pattern, an error naming the key when a pattern matches nothing."""
    if not pattern:
        return []
    rx = re.compile(pattern)
    names = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
    if not names:
        raise ValueError(f"quantize.teacher_forcing: {pattern!r} fully matches no module of "
                         f"{type(model).__name__} (qualified names such as 'rpn.head' or 'roi_heads.box_predictor')")
    return names


class TeacherForcing:
    """Hooks that make the student's modules whose qualified name fully matches ``pattern`` return
    the teacher's output of the same call (the k-th call of a module in a batch gets the teacher's
    k-th output), so that what reads them sees the teacher's: a detector's region heads then work on
    the teacher's proposals and detections, and their input rows pair with the teacher's. The teacher
    runs first on each batch; :meth:`end_batch` drops what the student did not take."""

    def __init__(self, teacher: nn.Module, student: nn.Module, pattern: str):
        self.queues: dict[str, deque] = {}
        self.handles: list = []
        for name in forced_modules(pattern, student):
            q = self.queues[name] = deque()
            self.handles.append(get_submodule(teacher, name).register_forward_hook(
                lambda m, args, out, q=q: q.append(out)))
            self.handles.append(get_submodule(student, name).register_forward_hook(
                lambda m, args, out, q=q: q.popleft() if q else None))

    def __bool__(self) -> bool:
        return bool(self.queues)

    def end_batch(self) -> None:
        for q in self.queues.values():
            q.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
