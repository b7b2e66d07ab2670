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

Start-up never waits without a limit: what the actors ask (GPUs, custom resources,
node by node) is compared with the cluster first, and a demand that can never fit
fails at once with the settings that would; each actor checks on its node that the
adapter's data paths are readable; a dead actor that cannot be replaced (its node
was lost and the rest cannot hold it) stops the run naming the node.

Actors reserve GPUs but no CPU slot, so the fit tasks can use the cores while
the actors are idle (collection, fitting and distillation never overlap).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..adapters import DataError, make_adapter
from ..config import ModelConfig
from ..executor import Executor, merge_output_moments, merge_shard_results, payload_nbytes
from ..finetune import Diverged, PhaseSpec, PhaseState, combine
from ..messages import CollectRequest, CollectResult, FitJob, FitResult, OutputMoments, OutputMomentsRequest
from ..worker import Worker, run_fit

log = logging.getLogger(__name__)


class _StatsWorker(Worker):
    """A :class:`Worker` in a Ray actor. It first checks that the data paths its adapter declares
    are readable on this node; if not, it builds nothing and :meth:`placement` reports the error."""

    def __init__(self, model_config, data_config: dict, device: str | None = None, threads: int | None = None):
        self._error = None
        adapter = make_adapter(model_config, data_config)
        unreadable = unreadable_paths(dict(adapter.data_paths()))
        if unreadable:
            key, path = unreadable[0]
            self._error = (f"{key}={path} is not readable on node {_node_label()}; every node needs the data at "
                           f"the same path (shared file system)")
            return
        super().__init__(model_config, data_config, device, threads)

    def placement(self) -> dict:
        """Where this actor runs: node id and address, the GPUs Ray gave it, and a start-up error."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "error": self._error}

    def set_group_backend(self, backend: str | None) -> None:
        self.group_backend = backend

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


def _node_label() -> str:
    return f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()[:12]})"


def unreadable_paths(paths: dict) -> list[tuple[str, str]]:
    """``(key, path)`` of every path in ``{key: path}`` that does not exist or cannot be read here."""
    bad = []
    for key, path in paths.items():
        if path is None:
            continue
        path = os.fspath(path)
        mode = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
        if not os.path.exists(path) or not os.access(path, mode):
            bad.append((key, path))
    return bad


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())
                     if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type")))


def _fits(node: dict, demand: dict[str, float], count: int) -> int:
    """How many actors asking ``demand`` fit in the resources ``node`` (at most ``count``)."""
    return min([count] + [int(node.get(r, 0.0) / amount + 1e-9) for r, amount in demand.items() if amount > 0])


def resource_problem(demand: dict[str, float], count: int, nodes: list[dict]) -> str | None:
    """None if ``count`` actors asking ``demand`` each can be placed on ``nodes`` (per-node resource
    dicts); otherwise a one-line explanation with the numbers and the settings that would fit."""
    capacity = sum(_fits(n, demand, count) for n in nodes)
    if capacity >= count:
        return None
    totals = {r: sum(n.get(r, 0.0) for n in nodes) for r in demand}
    hints = []
    if capacity >= 1:
        hints.append(f"--set executor.num_workers={capacity}")
    gpu = demand.get("GPU", 0.0)
    if gpu and totals["GPU"] == 0:
        hints.append("--set executor.num_gpus_per_worker=0")
    elif gpu:
        others = {r: a for r, a in demand.items() if r != "GPU"}
        for g in sorted({n.get("GPU", 0.0) / k for n in nodes for k in range(1, count + 1)}, reverse=True):
            g = math.floor(g * 100) / 100
            if 0 < g < gpu and sum(_fits(n, {**others, "GPU": g}, count) for n in nodes) >= count:
                hints.append(f"--set executor.num_gpus_per_worker={g:g}")
                break
    for r, amount in demand.items():
        if r != "GPU" and totals[r] == 0:
            hints.append(f"no node has {r!r}: start nodes with `ray start --resources '{{\"{r}\": N}}'` or "
                         f"drop executor.actor_resources.{r}")
    per_node = "; ".join(_fmt({r: n.get(r, 0.0) for r in demand}) for n in nodes)
    return (f"{count} stats actors asking {_fmt(demand)} each cannot be placed: the cluster's {len(nodes)} node(s) "
            f"can hold {capacity} of them (per node: {per_node})" + (f"; to fit: {' or '.join(hints)}" if hints else ""))


def cluster_autoscales() -> bool:
    """True if the connected cluster runs an autoscaler with a launcher config (it can add nodes
    later). Best effort, from the autoscaler's status; ``executor.schedule_timeout_s`` overrides it."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
        # without a launcher config the monitor runs a read-only autoscaler whose node types are
        # the nodes themselves ("node_<id>"); a launcher config names its types (e.g. gpu_worker)
        types = set((report.get("node_type_mapping") or {}).values())
        return bool(report.get("pending_launches") or report.get("pending_nodes")
                    or any(not str(t).startswith("node_") for t in types))
    except Exception:
        return False


def _cause(error: Exception) -> str:
    """The last ``SomeError: message`` line of a Ray error (its remote traceback), else its first line."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if ":" in line and head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[0] if lines else type(error).__name__


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://...``). With no cluster
    there, fail within seconds with one line instead of Ray's retries and traceback."""
    if address.startswith("ray://"):
        ray.init(address=address, log_to_driver=False)
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:  # auto: RAY_ADDRESS, else the latest cluster started on this machine
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise RuntimeError(f"--address {address}: {_cause(e)}") from None
    if resolved is None:
        raise RuntimeError(f"--address {address}: no running Ray cluster found; start one with `ray start --head` "
                           f"or leave --address out for a local one")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise RuntimeError(f"--address {address}: no Ray cluster answers at {resolved} "
                           f"({getattr(e, 'strerror', None) or e}); start one with `ray start --head` or fix the "
                           f"address") from None
    try:
        ray.init(address=resolved, log_to_driver=False)
    except Exception as e:
        raise RuntimeError(f"--address {address}: cannot join the Ray cluster at {resolved}: {_cause(e)}") from None
_fit_task = ray.remote(run_fit)


class RayExecutor(Executor):
    def __init__(self, num_workers: int = 2, address: str | None = None, num_cpus: int | None = None,
                 num_gpus_per_worker: float = 0.0, threads_per_worker: int = 1, max_in_flight: int = 8,
                 max_restarts: int = 3, actor_resources: dict | None = None,
                 schedule_timeout_s: float | None = None, start_timeout_s: float = 600.0):
        self.num_shards = num_workers
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus_per_worker = num_gpus_per_worker
        self.threads = threads_per_worker
        self.max_in_flight = max_in_flight
        self.max_restarts = max_restarts
        self.actor_resources = dict(actor_resources or {})   # custom resources each stats actor asks
        self.schedule_timeout_s = schedule_timeout_s        # wait this long for resources the cluster lacks now
        self.start_timeout_s = start_timeout_s              # an actor's start-up (model build) limit
        self.placement: list[dict] = []
        self.group_backend: str | None = None
        self.actors: list = []
        self._started_ray = False
        self._payload_ref = None
        self._teacher_ref = None   # the driver's teacher state, when it was shipped (load_teacher)
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
                connect(self.address)
            else:
                # fit tasks take 1 CPU each: no more of them than this machine has cores
                ray.init(num_cpus=self.num_cpus or min(self.num_shards, os.cpu_count() or 1), include_dashboard=False,
                         log_to_driver=False)
            self._started_ray = True
        if not isinstance(model_config, ModelConfig):   # an adapter instance holding the user's model: by value
            from .by_value import register_user_modules

            register_user_modules(model_config)
        self._model_config, self._data_config = model_config, data_config
        for a in self.actors:  # a restart of the same executor
            ray.kill(a)
        self._group_ready = False
        self._teacher_ref = None
        self.actors = []
        wait_s = self._check_resources()
        self.actors = [self._new_actor(wait=False) for _ in range(self.num_shards)]
        self.placement = self._await_actors(self.actors, wait_s)
        self._choose_group_backend()

    def _actor_demand(self) -> dict[str, float]:
        demand = {"GPU": float(self.num_gpus_per_worker)} if self.num_gpus_per_worker else {}
        demand.update({k: float(v) for k, v in self.actor_resources.items()})
        return demand

    def _check_resources(self) -> float:
        """Fail at once if the stats actors can never be placed on this cluster; returns how long
        to wait for them to be scheduled (longer when the cluster must first grow or free resources)."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if sum(n.get("CPU", 0.0) for n in nodes) < 1:
            raise RuntimeError("the Ray cluster has no CPU: codebook fits run as 1-CPU tasks; start nodes with "
                               "--num-cpus >= 1")
        problem = resource_problem(self._actor_demand(), self.num_shards, nodes)
        autoscaling = cluster_autoscales()
        if problem is not None:
            if self.schedule_timeout_s is None and not autoscaling:
                raise RuntimeError(problem)
            wait_s = self.schedule_timeout_s if self.schedule_timeout_s is not None else 600.0
            log.warning("%s; waiting up to %.0f s for the cluster to grow (%s)", problem, wait_s,
                        "autoscaling is configured" if autoscaling else "executor.schedule_timeout_s")
            return wait_s
        available = ray.available_resources()
        if resource_problem(self._actor_demand(), self.num_shards, [available]) is not None:
            wait_s = self.schedule_timeout_s if self.schedule_timeout_s is not None else 600.0
            log.warning("the stats actors fit on this cluster but not in what is free now (%s); waiting up to "
                        "%.0f s (executor.schedule_timeout_s)", _fmt(available), wait_s)
            return wait_s
        return self.schedule_timeout_s if self.schedule_timeout_s is not None else 0.0

    def _await_actors(self, actors: list, wait_s: float) -> list[dict]:
        """Every actor's placement (node id, node address, GPU ids); never blocks without a limit:
        scheduling gets ``wait_s`` more than the start-up timeout (the actor builds its model)."""
        refs = {a.placement.remote(): i for i, a in enumerate(actors)}
        deadline = time.monotonic() + self.start_timeout_s + wait_s
        placement: list = [None] * len(actors)
        last_note = time.monotonic()
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=min(10.0, max(0.0, deadline - time.monotonic())))
            if not ready:
                if time.monotonic() >= deadline:
                    missing = sorted(refs.values())
                    raise RuntimeError(
                        f"{len(missing)} of {len(actors)} stats actors did not start within "
                        f"{self.start_timeout_s + wait_s:.0f} s (each asks {_fmt(self._actor_demand()) or 'no resources'}; "
                        f"the cluster has {_fmt(ray.cluster_resources())}, free {_fmt(ray.available_resources())}); "
                        f"lower executor.num_workers or raise executor.schedule_timeout_s / executor.start_timeout_s")
                if time.monotonic() - last_note > 30:
                    log.info("waiting for %d stats actors to be scheduled (free: %s)", len(refs),
                             _fmt(ray.available_resources()))
                    last_note = time.monotonic()
                continue
            i = refs.pop(ready[0])
            try:
                placement[i] = ray.get(ready[0])
            except RayActorError as e:
                raise RuntimeError(f"stats actor {i} failed to start: {_cause(e)}") from None
            if placement[i].get("error"):
                raise RuntimeError(placement[i]["error"])
        return placement

    def _choose_group_backend(self) -> None:
        """NCCL refuses two ranks on one device: when actors share a GPU (fractional
        ``num_gpus_per_worker``), the distillation group uses gloo instead, and says so."""
        seen, shared = set(), []
        for p in self.placement:
            for gpu in p.get("gpu_ids", []):
                key = (p["node_id"], str(gpu))
                if key in seen:
                    shared.append(key)
                seen.add(key)
        self.group_backend = "gloo" if shared else None
        if shared:
            node, gpu = shared[0]
            log.warning("stats actors share GPU %s on node %s (num_gpus_per_worker=%s): NCCL refuses two ranks on "
                        "one device, so distillation all-reduces with gloo", gpu, node[:12], self.num_gpus_per_worker)
        ray.get([a.set_group_backend.remote(self.group_backend) for a in self.actors], timeout=self.start_timeout_s)

    def _new_actor(self, wait: bool = True):
        """A stats actor. ``wait`` (a replacement during a run): block until it runs; if the live
        nodes can no longer hold all the actors (a node was lost), fail at once naming the lost
        nodes, unless the cluster autoscales or ``schedule_timeout_s`` allows waiting for it."""
        if wait:
            nodes = ray.nodes()
            problem = resource_problem(self._actor_demand(), self.num_shards,
                                       [n["Resources"] for n in nodes if n.get("Alive")])
            lost = [f"{n.get('NodeManagerAddress')} (node id {n.get('NodeID', '')[:12]})"
                    for n in nodes if not n.get("Alive")]
            where = f"node {', '.join(lost)} was lost; " if lost else ""
            if problem is not None and self.schedule_timeout_s is None and not cluster_autoscales():
                raise RuntimeError(f"a stats actor died and cannot be replaced: {where}{problem}; once the cluster "
                                   f"has the resources again, continue the run with --resume")
        actor = StatsWorker.options(num_cpus=0, num_gpus=self.num_gpus_per_worker, resources=self.actor_resources,
                                    scheduling_strategy="SPREAD").remote(
            self._model_config, self._data_config, None, self.threads)
        actor.set_group_backend.remote(self.group_backend)  # actor calls run in order: no wait needed
        if wait:
            try:
                self._await_actors([actor], self.schedule_timeout_s or 0.0)
            except RuntimeError as e:
                raise RuntimeError(f"a stats actor died and its replacement did not start: {where}{e}; continue "
                                   f"the run with --resume") from None
        return actor

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
        if self._teacher_ref is not None:
            ray.get(self.actors[i].load_teacher.remote(self._teacher_ref))
        if self._payload_ref is not None:
            ray.get(self.actors[i].load_student.remote(self._payload_ref))
        self._group_ready = False

    # -- student ------------------------------------------------------------------------------
    def load_student(self, payload: dict) -> int:
        self._payload_ref = ray.put(payload)  # once per stage; every actor reads the same object
        self._call_all(lambda i: self.actors[i].load_student.remote(self._payload_ref))
        return payload_nbytes(payload)

    def load_teacher(self, state: dict) -> int:
        self._teacher_ref = ray.put(state)
        self._call_all(lambda i: self.actors[i].load_teacher.remote(self._teacher_ref))
        return sum(t.numel() * t.element_size() for t in state.values())

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

    def output_moments(self, request: OutputMomentsRequest, progress=None) -> OutputMoments:
        results = self._call_all(
            lambda shard: self.actors[shard].output_moments.remote(request, shard, self.num_shards),
            on_result=(lambda r: progress(r.n_images)) if progress else None)
        return merge_output_moments(results)

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
