"""A tiny actor the rank-0 worker reports its distillation steps to; the driver polls it
while it waits for the phase, so its progress bar moves with the workers."""

from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.last: tuple[int, float, float] | None = None

    def report(self, step: int, loss: float) -> None:
        self.last = (step, loss, time.time())

    def reset(self) -> None:
        self.last = None

    def get(self) -> tuple[int, float, float] | None:
        return self.last


def reporter(board, stop: int, min_interval_s: float = 0.05):
    """A ``progress(step, loss)`` callback for a worker: at most one report per
    ``min_interval_s`` (and always the last step), fire and forget."""
    last = [0.0]

    def report(step: int, loss: float) -> None:
        now = time.monotonic()
        if step >= stop or now - last[0] >= min_interval_s:
            board.report.remote(step, loss)
            last[0] = now

    return report
