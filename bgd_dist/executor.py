"""The executor interface the runner talks to, and the in-process implementation.

Both executors split the calibration data into the same ``num_shards`` shards
and merge the shards' statistics in shard order, so they give identical
statistics and codebooks for the same seed.
"""

from __future__ import annotations

from typing import Callable

from .core.stats import merge_all, stats_from_state
from .finetune import PhaseSpec
from .worker import FitJob, Worker, run_fit


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

    def collect(self, layers: list, n_images: int, batch_size: int, seed: int,
                progress: Callable[[int], None] | None = None) -> dict:
        """Merged statistics ``{name: stats}`` of ``layers`` over the calibration shards."""
        raise NotImplementedError

    def fit(self, jobs: list[FitJob], progress: Callable[[str, object, float], None] | None = None) -> dict:
        """``{name: (Codebook, seconds)}`` for every job."""
        raise NotImplementedError

    def distill(self, spec: PhaseSpec) -> dict:
        raise NotImplementedError

    def load_compressed(self, path: str) -> None:
        """Make the compressed file at ``path`` every worker's student."""
        raise NotImplementedError

    def evaluate(self, which: str, max_images: int | None) -> list:
        """Evaluator states of every evaluation shard (``which``: teacher or student)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_shard_results(results: list[dict]) -> dict:
    """Merge per-shard ``collect`` results (in shard order) into ``{name: stats}``."""
    names = list(results[0]["stats"])
    return {n: merge_all([stats_from_state(r["stats"][n]) for r in results]) for n in names}


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

    def collect(self, layers, n_images, batch_size, seed, progress=None) -> dict:
        results = []
        for shard in range(self.num_shards):
            results.append(self.worker.collect(layers, shard, self.num_shards, n_images, batch_size, seed))
            if progress:
                progress(results[-1]["n_images"])
        return merge_shard_results(results)

    def fit(self, jobs, progress=None) -> dict:
        out = {}
        for job in jobs:
            codebook, seconds = run_fit(job)
            out[job.name] = (codebook, seconds)
            if progress:
                progress(job.name, codebook, seconds)
        return out

    def distill(self, spec: PhaseSpec) -> dict:
        return self.worker.distill(spec, 0, 1)

    def load_compressed(self, path: str) -> None:
        self.worker.load_compressed(path)

    def evaluate(self, which, max_images) -> list:
        return [self.worker.evaluate(which, shard, self.num_shards, max_images) for shard in range(self.num_shards)]
