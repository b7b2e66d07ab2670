"""The executor interface the runner talks to, and the in-process implementation.

Both executors split the calibration data into the same ``num_shards`` shards
and merge the shards' statistics in shard order, so they give identical
statistics and codebooks for the same seed.
"""

from __future__ import annotations

from typing import Callable

from .core.stats import merge_all, stats_from_state
from .finetune import PhaseSpec, PhaseState, combine
from .messages import (CollectRequest, CollectResult, FitJob, FitResult, OutputMoments, OutputMomentsRequest,
                       ShardOutputMoments, ShardStats)
from .worker import Worker, run_fit


def payload_nbytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload["state"].values())


class Executor:
    """collect -> fit -> distill, for one stage at a time."""

    num_shards: int = 1

    def start(self, model_config, data_config: dict) -> None:
        raise NotImplementedError

    def load_student(self, payload: dict) -> int:
        """Make every worker's student equal to ``payload``; returns the bytes shipped."""
        raise NotImplementedError

    def load_teacher(self, state: dict) -> int:
        """Make every worker's teacher the state dict ``state`` (same architecture; the driver's
        teacher after a function-preserving change such as a channel permutation); returns the
        bytes shipped. Workers started later (replacements) get it too."""
        raise NotImplementedError

    def collect(self, request: CollectRequest, progress: Callable[[int], None] | None = None) -> CollectResult:
        """The requested statistics over the calibration shards, merged in shard order
        (``progress(n_images)`` after each shard)."""
        raise NotImplementedError

    def output_moments(self, request: OutputMomentsRequest,
                       progress: Callable[[int], None] | None = None) -> OutputMoments:
        """Per-channel output moments of the requested layers on the teacher and on the current
        student over the calibration shards, merged in shard order (``progress(n_images)``)."""
        raise NotImplementedError

    def fit(self, jobs: list[FitJob], progress: Callable[[FitResult], None] | None = None) -> dict[str, FitResult]:
        """``{name: FitResult}`` for every job, in the jobs' order (``progress`` after each fit)."""
        raise NotImplementedError

    #: how many workers share a distillation phase (the BN buffer sets a phase checkpoint holds)
    distill_world: int = 1

    def distill(self, spec: PhaseSpec, state: PhaseState | None = None, stop: int | None = None,
                progress: Callable[[int, float], None] | None = None,
                on_event: Callable[..., None] | None = None) -> PhaseState:
        """Steps ``state.step`` (0 without a state) to ``stop`` (the end) of a distillation phase on
        the workers' students: the state after ``stop`` (losses averaged over the workers).
        ``progress(step, loss)`` as the workers go; ``on_event(name, **fields)`` for recoveries."""
        raise NotImplementedError

    def load_compressed(self, path: str) -> None:
        """Make the compressed file at ``path`` every worker's student."""
        raise NotImplementedError

    def evaluate(self, which: str, max_images: int | None, progress: Callable[[int], None] | None = None) -> list:
        """Evaluator states of every evaluation shard (``which``: teacher or student);
        ``progress(1)`` as each shard finishes."""
        raise NotImplementedError

    def skipped_items(self) -> list[str]:
        """The input files the workers left out as unreadable, sorted, each once."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_shard_results(results: list[ShardStats]) -> CollectResult:
    """Merge per-shard ``collect`` results (in shard order). Each layer's shard states are let go
    once merged, so the driver holds the shards' copies of one layer at a time, not of the stage."""
    names = list(results[0].states)
    stats = {n: merge_all([stats_from_state(r.states.pop(n)) for r in results]) for n in names}
    return CollectResult(stats, sum(r.n_images for r in results), sum(r.seconds for r in results),
                         sum(r.data_seconds for r in results),
                         tuple(r.n_images / r.seconds if r.seconds > 0 else 0.0 for r in results))


def merge_output_moments(results: list[ShardOutputMoments]) -> OutputMoments:
    """Merge per-shard output moments (in shard order, like :func:`merge_shard_results`)."""
    merged = {which: {n: merge_all([stats_from_state(getattr(r, which)[n]) for r in results])
                      for n in getattr(results[0], which)} for which in ("teacher", "student")}
    return OutputMoments(merged["teacher"], merged["student"], sum(r.n_images for r in results),
                         sum(r.seconds for r in results))


class SerialExecutor(Executor):
    """Everything in this process, shard after shard; no Ray."""

    def __init__(self, num_shards: int = 1, device: str | None = None, threads: int | None = None):
        self.num_shards = num_shards
        self.device = device
        self.threads = threads
        self.worker: Worker | None = None

    def start(self, model_config, data_config: dict) -> None:
        self.worker = Worker(model_config, data_config, self.device, self.threads)

    def load_student(self, payload: dict) -> int:
        self.worker.load_student(payload)
        return 0

    def load_teacher(self, state: dict) -> int:
        self.worker.load_teacher(state)
        return 0

    def _per_shard(self, call: Callable, progress: Callable[[int], None] | None) -> list:
        """``call(shard, n_shards)`` for every shard in order; ``progress`` gets each result's images."""
        results = []
        for shard in range(self.num_shards):
            results.append(call(shard, self.num_shards))
            if progress:
                progress(results[-1].n_images)
        return results

    def collect(self, request, progress=None) -> CollectResult:
        return merge_shard_results(self._per_shard(lambda s, n: self.worker.collect(request, s, n), progress))

    def output_moments(self, request, progress=None) -> OutputMoments:
        return merge_output_moments(self._per_shard(lambda s, n: self.worker.output_moments(request, s, n), progress))

    def fit(self, jobs, progress=None) -> dict[str, FitResult]:
        out = {}
        for job in jobs:
            out[job.name] = run_fit(job)
            if progress:
                progress(out[job.name])
        return out

    def distill(self, spec, state=None, stop=None, progress=None, on_event=None) -> PhaseState:
        return combine(state, [self.worker.distill(spec, 0, 1, state, stop, progress)])

    def load_compressed(self, path: str) -> None:
        self.worker.load_compressed(path)

    def skipped_items(self) -> list[str]:
        return sorted(set(self.worker.skipped_items()))

    def evaluate(self, which, max_images, progress=None) -> list:
        out = []
        for shard in range(self.num_shards):
            out.append(self.worker.evaluate(which, shard, self.num_shards, max_images))
            if progress:
                progress(1)
        return out
