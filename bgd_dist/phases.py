"""Distillation phases in checkpointed pieces, resumable mid-phase.

A phase (the layer-wise distillation of one stage, or the global one) runs as
pieces of ``finetune.checkpoint_every`` steps. After each piece the driver
writes the phase state (centroids, SGD momentum and learning rate, the step,
every worker's BN buffers in the global phase, the loss history) to the phase's
checkpoint file, atomically. A run resumed with ``--resume`` finds the file and
continues the interrupted phase after its last checkpoint; since step k's batch
depends only on (seed, phase, k) and the state is restored exactly, the result
is bit for bit that of a run that was never interrupted.

``BGD_TEST_KILL_AT=PHASE[:STAGE]:STEP`` (tests and benchmarks only) makes the
process SIGKILL itself right after the first checkpoint at or after STEP of that
phase (``layerwise:1:40``, ``global:20``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from .finetune import PhaseSpec, PhaseState, phase_buffers
from .io import atomic_write
from .nn.modules import pq_layers
from .progress import PhaseBar

log = logging.getLogger("bgd.distill")

CHECKPOINT_VERSION = 1
KILL_ENV = "BGD_TEST_KILL_AT"


def checkpoint_path(out_dir: str | Path, spec: PhaseSpec, stage: int | None = None) -> Path:
    out = Path(out_dir)
    return out / "stages" / str(stage) / "distill.pt" if spec.name == "layerwise" else out / "global" / "distill.pt"


def start_digest(student: torch.nn.Module, spec: PhaseSpec) -> str:
    """A digest of what the phase starts from (its centroids, the extra parameters that train, and
    the BN buffers when they train)."""
    layers = pq_layers(student)
    names = list(spec.layers) if spec.layers is not None else sorted(layers)
    tensors = {f"{n}.centroids": layers[n].centroids for n in names}
    if spec.params:
        own = dict(student.named_parameters())
        tensors.update({f"param:{n}": own[n] for n in spec.params})
    if spec.train_mode:
        tensors.update(phase_buffers(student))
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, spec: PhaseSpec, state: PhaseState, digest: str) -> None:
    obj = {"version": CHECKPOINT_VERSION, "spec": _spec_dict(spec), "start": digest, "state": state.to_dict()}
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, spec: PhaseSpec, digest: str, world: int) -> PhaseState | None:
    """The phase state saved at ``path`` if it belongs to this phase (same settings, same starting
    point, same number of workers); None (with a warning naming the file and why) otherwise."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = PhaseState.from_dict(obj["state"])
    except Exception as e:  # a damaged file: the phase is deterministic, start it again
        log.warning("%s: unreadable distillation checkpoint (%s); restarting the %s phase", path, e, spec.name)
        return None
    why = None
    if obj.get("version") != CHECKPOINT_VERSION:
        why = f"version {obj.get('version')}"
    elif obj.get("spec") != _spec_dict(spec):
        why = "other phase settings"
    elif obj.get("start") != digest:
        why = "another starting point"
    elif spec.train_mode and len(state.buffers) != world:
        why = f"{len(state.buffers)} workers instead of {world}"
    elif not 0 <= state.step <= spec.iterations:
        why = f"step {state.step} outside the phase"
    if why:
        log.warning("%s: checkpoint of %s; restarting the %s phase from step 0", path, why, spec.name)
        return None
    return state


def _spec_dict(spec: PhaseSpec) -> dict:
    """The settings a checkpoint must match: the teacher cache changes no result and is left out,
    and ``params`` only counts when the phase trains extra parameters (earlier checkpoints stay valid)."""
    d = dataclasses.asdict(spec)
    d.pop("teacher_cache_mb")
    if not d["params"]:
        d.pop("params")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _kill_target() -> tuple[str, int | None, int] | None:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    parts = value.split(":")
    if len(parts) == 2:
        return parts[0], None, int(parts[1])
    return parts[0], int(parts[1]), int(parts[2])


def _maybe_kill(spec: PhaseSpec, stage: int | None, step: int) -> None:
    target = _kill_target()
    if target is None:
        return
    phase, at_stage, at_step = target
    if phase == spec.name and (at_stage is None or at_stage == stage) and step >= at_step:
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def run_phase(executor, spec: PhaseSpec, path: Path, every: int, student: torch.nn.Module,
              event: Callable[..., None] | None = None, stage: int | None = None, show: bool = True,
              on_checkpoint: Callable[[], None] | None = None, desc: str | None = None,
              guard: Callable[[PhaseSpec, PhaseState, int], None] | None = None) -> PhaseState:
    """Run ``spec`` on ``executor`` (whose workers hold ``student``) in pieces of ``every`` steps,
    checkpointing each to ``path`` and continuing from it when it is there. Returns the final state.

    ``guard(spec, state, first_step)`` sees the state after every piece (the steps from
    ``first_step`` are new) and may raise (a divergence) before the state is checkpointed.
    ``event(name, **fields)`` receives ``phase_start``, one ``loss`` record per checkpoint (the
    piece's mean and last loss, steps/s, ETA), the executor's ``restart`` records and ``phase_end``.
    """
    event = event or (lambda *a, **k: None)
    every = max(1, int(every))
    world = executor.distill_world
    digest = start_digest(student, spec)
    state = load_checkpoint(path, spec, digest, world)
    resumed_from = state.step if state is not None else 0
    if state is not None:
        log.info("%s distillation%s: resuming from the checkpoint at step %d/%d (%s)", spec.name,
                 "" if stage is None else f" of stage {stage}", state.step, spec.iterations, path)
    event("phase_start", phase=spec.name, stage=stage, total=spec.iterations, start_step=resumed_from,
          checkpoint_every=every, workers=world)
    pbar = PhaseBar(spec.iterations, desc or (spec.name if stage is None else f"{spec.name} {stage}"), show,
                    resumed_from)
    t0 = time.perf_counter()
    ckpt_seconds = plot_seconds = 0.0
    step = resumed_from

    def on_event(name: str, **fields) -> None:
        if name == "restart":
            pbar.rewind(fields.get("from_step", step))
        event(name, stage=stage, **fields)

    try:
        while step < spec.iterations:
            stop = min(spec.iterations, (step // every + 1) * every)
            try:
                state = executor.distill(spec, state, stop, progress=pbar.update, on_event=on_event)
            except RuntimeError as e:
                if stage is None:
                    raise
                raise RuntimeError(f"stage {stage}: {e}") from e
            pbar.update(state.step, state.losses[-1] if state.losses else None)
            if guard is not None:   # before the checkpoint: a diverged state is never saved
                guard(spec, state, step)
            t = time.perf_counter()
            save_checkpoint(path, spec, state, digest)
            ckpt_seconds += time.perf_counter() - t
            if on_checkpoint is not None:
                t = time.perf_counter()
                on_checkpoint()
                plot_seconds += time.perf_counter() - t
            piece = state.losses[step:state.step]
            step = state.step
            elapsed = time.perf_counter() - t0
            rate = (step - resumed_from) / elapsed if elapsed > 0 else 0.0
            event("loss", phase=spec.name, stage=stage, step=step, total=spec.iterations,
                  loss=sum(piece) / max(len(piece), 1), loss_last=piece[-1] if piece else None,
                  seconds=elapsed, steps_per_s=rate,
                  eta_s=(spec.iterations - step) / rate if rate > 0 else None)
            _maybe_kill(spec, stage, step)
    finally:
        pbar.close()
    if state is None:  # a phase of 0 steps
        state = PhaseState()
    seconds = time.perf_counter() - t0
    losses = state.losses
    event("phase_end", phase=spec.name, stage=stage, iterations=len(losses), resumed_from=resumed_from,
          loss_start=losses[0] if losses else None, loss_end=losses[-1] if losses else None, seconds=seconds,
          checkpoint_seconds=ckpt_seconds, plot_seconds=plot_seconds)
    return state
