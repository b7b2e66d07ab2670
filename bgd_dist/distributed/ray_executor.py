"""The Ray executor: stats actors over data shards, codebook fits as Ray tasks,
data-parallel distillation over the actors.

- One ``StatsWorker`` actor per GPU (or CPU slot) keeps a model replica. The
  student goes to the object store once per stage (``ray.put``) and every
  actor loads it from there. Actors return merged statistics of their shard,
  never activations.
- A shard whose actor dies is recomputed exactly once on a fresh actor; only
  results that arrived are merged, so nothing is counted twice.
- Each codebook fit is one Ray task (1 CPU); at most ``max_in_flight`` are
  submitted at a time (``ray.wait`` back-pressure).
- Distillation: the actors form a torch.distributed group (gloo on CPU, nccl on
  GPU) and average centroid gradients every step (DDP semantics). The group is
  formed once and re-formed only after an actor was replaced.

Actors reserve GPUs but no CPU slot, so the fit tasks can use the cores while
the actors are idle (collection, fitting and distillation never overlap).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..adapters import DataError
from ..executor import Executor, merge_shard_results, payload_nbytes
from ..finetune import Diverged, PhaseSpec, PhaseState, combine
from ..messages import CollectRequest, CollectResult, FitJob, FitResult
from ..worker import Worker, run_fit

log = logging.getLogger(__name__)


class _StatsWorker(Worker):
    def address(self) -> tuple[str, int]:
        """This actor's node address and a free TCP port there (for the process group)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def pid(self) -> int:
        return os.getpid()

    def distill_reporting(self, spec: PhaseSpec, rank: int, world: int, state: PhaseState | None, stop: int,
                          board=None, die_at: int | None = None) -> PhaseState:
        """``distill`` with the steps reported to the driver's progress board (rank 0). ``die_at``
        (tests): this actor's process SIGKILLs itself after that step."""
        from .progress import reporter

        report = reporter(board, stop) if board is not None else None
        if die_at is not None:
            def progress(step, loss, report=report):
                if report is not None:
                    report(step, loss)
                if step >= die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        else:
            progress = report
        return self.distill(spec, rank, world, state, stop, progress)


StatsWorker = ray.remote(_StatsWorker)
_fit_task = ray.remote(run_fit)


class RayExecutor(Executor):
    def __init__(self, num_workers: int = 2, address: str | None = None, num_cpus: int | None = None,
                 num_gpus_per_worker: float = 0.0, threads_per_worker: int = 1, max_in_flight: int = 8,
                 max_restarts: int = 3):
        self.num_shards = num_workers
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus_per_worker = num_gpus_per_worker
        self.threads = threads_per_worker
        self.max_in_flight = max_in_flight
        self.max_restarts = max_restarts
        self.actors: list = []
        self._started_ray = False
        self._payload_ref = None
        self._group_ready = False
        self.restarts = 0
        self.fault_injection: Callable[[list], None] | None = None  # tests: called before the calls are submitted
        # tests: called with (phase, step, actors) whenever rank 0 reports a new distillation step
        self.distill_fault: Callable[[str, int, list], None] | None = None
        # tests: (phase, step, actor index): that actor's process SIGKILLs itself after that step, once
        self.kill_actor_at: tuple[str, int, int] | None = None
        self._board = None
        self._distill_key = None
        self._distill_restarts = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, model_config, data_config: dict) -> None:
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus or self.num_shards, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        self._model_config, self._data_config = model_config, data_config
        for a in self.actors:  # a restart of the same executor
            ray.kill(a)
        self._group_ready = False
        self.actors = [self._new_actor() for _ in range(self.num_shards)]
        ray.get([a.ping.remote() for a in self.actors])

    def _new_actor(self):
        return StatsWorker.options(num_cpus=0, num_gpus=self.num_gpus_per_worker,
                                   scheduling_strategy="SPREAD").remote(
            self._model_config, self._data_config, None, self.threads)

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors = []
        if self._board is not None:
            try:
                ray.kill(self._board)
            except Exception:
                pass
            self._board = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _replace_actor(self, i: int) -> None:
        self.restarts += 1
        log.warning("stats actor %d died; starting a replacement", i)
        try:
            ray.kill(self.actors[i])
        except Exception:
            pass
        self.actors[i] = self._new_actor()
        if self._payload_ref is not None:
            ray.get(self.actors[i].load_student.remote(self._payload_ref))
        self._group_ready = False

    # -- student ------------------------------------------------------------------------------
    def load_student(self, payload: dict) -> int:
        self._payload_ref = ray.put(payload)  # once per stage; every actor reads the same object
        self._call_all(lambda i: self.actors[i].load_student.remote(self._payload_ref))
        return payload_nbytes(payload)

    def _call_all(self, submit: Callable[[int], object], on_result: Callable[[object], None] | None = None) -> list:
        """``submit(i)`` for every actor ``i`` (actor ``i`` owns shard ``i``), replacing a dead actor
        and resubmitting its call, at most ``max_restarts`` times. Only calls that returned are kept,
        so a shard is never counted twice."""
        results = [None] * len(self.actors)
        if self.fault_injection is not None:  # before submitting: a call on a killed actor always fails
            self.fault_injection(self.actors)
        pending = {submit(i): i for i in range(len(self.actors))}
        attempts = [0] * len(self.actors)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayTaskError as e:
                if isinstance(getattr(e, "cause", None), DataError):   # bad input: its message, no traceback
                    raise DataError(str(e.cause)) from None
                raise
            except RayActorError:
                attempts[i] += 1
                if attempts[i] > self.max_restarts:
                    raise RuntimeError(f"stats actor {i} died {attempts[i]} times; giving up") from None
                self._replace_actor(i)
                pending[submit(i)] = i
                continue
            if on_result is not None:
                on_result(results[i])
        return results

    # -- statistics ---------------------------------------------------------------------------
    def collect(self, request: CollectRequest, progress=None) -> CollectResult:
        results = self._call_all(
            lambda shard: self.actors[shard].collect.remote(request, shard, self.num_shards),
            on_result=(lambda r: progress(r.n_images)) if progress else None)
        return merge_shard_results(results)

    # -- codebooks ----------------------------------------------------------------------------
    def fit(self, jobs: list[FitJob], progress=None) -> dict[str, FitResult]:
        out, pending, queue = {}, {}, list(jobs)
        while queue or pending:
            while queue and len(pending) < self.max_in_flight:
                job = queue.pop(0)
                pending[_fit_task.options(num_cpus=1).remote(job)] = job.name
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise RuntimeError(f"codebook fit failed for layer {name!r}: {cause}") from None
            out[name] = result
            if progress:
                progress(result)
        return {job.name: out[job.name] for job in jobs}

    def load_compressed(self, path: str) -> None:
        self._payload_ref = None
        self._call_all(lambda i: self.actors[i].load_compressed.remote(path))

    def skipped_items(self) -> list[str]:
        return sorted({p for paths in self._call_all(lambda i: self.actors[i].skipped_items.remote()) for p in paths})

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, which, max_images, progress=None) -> list:
        n = len(self.actors)
        return self._call_all(lambda i: self.actors[i].evaluate.remote(which, i, n, max_images),
                              on_result=(lambda r: progress(1)) if progress else None)

    # -- distillation -------------------------------------------------------------------------
    @property
    def distill_world(self) -> int:
        return self.num_shards

    def _ensure_group(self) -> None:
        if self._group_ready or len(self.actors) == 1:
            return
        host, port = ray.get(self.actors[0].address.remote())
        init = f"tcp://{host}:{port}"
        world = len(self.actors)
        ray.get([a.setup_group.remote(init, rank, world) for rank, a in enumerate(self.actors)])
        self._group_ready = True

    def _progress_board(self):
        if self._board is None:
            from .progress import ProgressBoard

            self._board = ProgressBoard.remote()
        return self._board

    def distill(self, spec: PhaseSpec, state: PhaseState | None = None, stop: int | None = None,
                progress: Callable[[int, float], None] | None = None,
                on_event: Callable[..., None] | None = None) -> PhaseState:
        """Steps ``state.step`` to ``stop`` of ``spec`` on every actor (data parallel). An actor that
        dies is replaced, the group re-formed, every actor restored to ``state`` (the last
        checkpoint) and the piece run again, at most ``max_restarts`` times per phase."""
        start = state.step if state is not None else 0
        stop = spec.iterations if stop is None else min(stop, spec.iterations)
        key = (spec.name, spec.layers, spec.seed)
        if self._distill_key != key:
            self._distill_key, self._distill_restarts = key, 0
        board = self._progress_board()
        state_ref = ray.put(state)   # once for every actor
        while True:
            self._ensure_group()
            world = len(self.actors)
            ray.get(board.reset.remote())
            die = [None] * world
            if self.kill_actor_at is not None and self.kill_actor_at[0] == spec.name \
                    and start < self.kill_actor_at[1] < stop:
                die[self.kill_actor_at[2]] = self.kill_actor_at[1]
                self.kill_actor_at = None
            refs = {a.distill_reporting.remote(spec, rank, world, state_ref, stop, board if rank == 0 else None,
                                               die[rank]): rank
                    for rank, a in enumerate(self.actors)}
            results, dead, failed, seen = self._wait_distill(refs, spec, progress)
            if not dead:
                if failed:
                    rank, err = failed[0]
                    cause = err.cause if getattr(err, "cause", None) is not None else err
                    if isinstance(cause, Diverged):
                        raise cause from None
                    raise RuntimeError(f"{spec.name} distillation failed on actor {rank} between steps {start} "
                                       f"and {stop}: {cause}") from None
                return combine(state, results)
            self._distill_restarts += 1
            step = max(seen, start)
            if self._distill_restarts > self.max_restarts:
                raise RuntimeError(f"{spec.name} distillation: actor {dead[0]} died near step {step} "
                                   f"(restart {self._distill_restarts} of at most {self.max_restarts} in this "
                                   f"phase); giving up") from None
            log.warning("%s distillation: actor %s died near step %d; replacing it and continuing from the "
                        "checkpoint at step %d (restart %d/%d)", spec.name, ", ".join(map(str, dead)), step, start,
                        self._distill_restarts, self.max_restarts)
            for i in dead:
                self._replace_actor(i)
            # the survivors ran past the checkpoint: every actor goes back to the phase's start student
            # (the checkpoint restores what the phase changed)
            if self._payload_ref is not None:
                ray.get([a.load_student.remote(self._payload_ref) for a in self.actors])
            self._group_ready = False
            if on_event is not None:
                on_event("restart", phase=spec.name, step=step, from_step=start, actors=dead,
                         steps_redone=step - start, restarts=self._distill_restarts)

    def _wait_distill(self, refs: dict, spec: PhaseSpec, progress, grace_s: float = 30.0):
        """Wait for one piece on every actor, polling the progress board. Returns the results (rank
        order), the ranks whose actor died, the ranks that raised, and the last step reported."""
        results: list = [None] * len(refs)
        dead, failed = [], []
        seen = 0
        pending = dict(refs)
        deadline = None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.1)
            last = ray.get(self._board.get.remote())
            if last is not None and last[0] > seen:
                seen = last[0]
                if progress is not None:
                    progress(seen, last[1])
                if self.distill_fault is not None:
                    self.distill_fault(spec.name, seen, self.actors)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except RayActorError:
                    dead.append(rank)
                except RayTaskError as e:   # e.g. the collective failing because a peer died
                    failed.append((rank, e))
            if dead and deadline is None:
                deadline = time.monotonic() + grace_s
            if pending and deadline is not None and time.monotonic() > deadline:
                for ref, rank in pending.items():   # stuck in a collective with a dead peer
                    dead.append(rank)
                pending = {}
        return results, sorted(set(dead)), failed, seen   # with a dead peer, the others' errors are its echo
