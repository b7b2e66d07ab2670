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

import dataclasses
import logging
import socket
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..config import ModelConfig
from ..executor import Executor, merge_shard_results, payload_nbytes
from ..finetune import PhaseSpec
from ..messages import CollectRequest, CollectResult, DistillResult, FitJob, FitResult
from ..worker import Worker, run_fit

log = logging.getLogger(__name__)


class _StatsWorker(Worker):
    def address(self) -> tuple[str, int]:
        """This actor's node address and a free TCP port there (for the process group)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port


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

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, model_config, data_config: dict) -> None:
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus or self.num_shards, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        if not isinstance(model_config, ModelConfig):   # an adapter instance holding the user's model: by value
            from .by_value import register_user_modules

            register_user_modules(model_config)
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

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, which, max_images) -> list:
        n = len(self.actors)
        return self._call_all(lambda i: self.actors[i].evaluate.remote(which, i, n, max_images))

    # -- distillation -------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready or len(self.actors) == 1:
            return
        host, port = ray.get(self.actors[0].address.remote())
        init = f"tcp://{host}:{port}"
        world = len(self.actors)
        ray.get([a.setup_group.remote(init, rank, world) for rank, a in enumerate(self.actors)])
        self._group_ready = True

    def distill(self, spec: PhaseSpec) -> DistillResult:
        self._ensure_group()
        world = len(self.actors)
        refs = [a.distill.remote(spec, rank, world) for rank, a in enumerate(self.actors)]
        try:
            results = ray.get(refs)
        except RayActorError as e:
            self._group_ready = False
            raise RuntimeError(f"{spec.name} distillation: a worker died ({e}); resume the run with --resume") from e
        n = len(results[0].losses)
        return dataclasses.replace(results[0], losses=[sum(r.losses[i] for r in results) / world for i in range(n)])
