"""Distillation of the centroids (METHOD.md §4), one process's share of it.

Layer-wise: only the stage's centroids train, the student stays in eval mode.
Global: all centroids train, the student is in train mode (BN running
statistics update); BN affine parameters, biases and uncompressed layers stay
frozen. The loss and the forward come from the adapter. With several workers
each computes the gradient of its part of the global batch and the gradients
are averaged (``reduce_grads``), which equals one process on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .batchnorm import keep_in_eval_mode
from .student import centroid_parameters


@dataclass(frozen=True)
class PhaseSpec:
    name: str                              # "layerwise" or "global"
    iterations: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int                        # global batch, split evenly over workers
    milestones: tuple[int, ...] = ()       # iterations at which lr is multiplied by gamma
    gamma: float = 0.1
    train_mode: bool = False
    layers: tuple[str, ...] | None = None  # quantized layers whose centroids train (None: all)
    seed: int = 0
    eval_modules: tuple[str, ...] = ()     # modules kept in eval mode in a train-mode phase (folded BN)


def layerwise_spec(cfg, layers, seed: int = 0) -> PhaseSpec:
    return PhaseSpec("layerwise", cfg.iterations, cfg.effective_lr, cfg.momentum, cfg.weight_decay, cfg.batch_size,
                     train_mode=False, layers=tuple(layers), seed=seed)


def global_spec(cfg, seed: int = 0, eval_modules: tuple[str, ...] = ()) -> PhaseSpec:
    total = cfg.epochs * cfg.iterations_per_epoch
    step = cfg.lr_step_epochs * cfg.iterations_per_epoch
    milestones = tuple(range(step, total, step)) if step > 0 else ()
    return PhaseSpec("global", total, cfg.effective_lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, milestones,
                     cfg.lr_gamma, train_mode=True, layers=None, seed=seed, eval_modules=tuple(eval_modules))


class Diverged(FloatingPointError):
    """A distillation phase whose loss turned non-finite or rose far above where it started."""

    def __init__(self, phase: str, step: int, lr: float, loss: float, reason: str):
        self.phase, self.step, self.lr, self.loss, self.reason = phase, step, lr, loss, reason
        super().__init__(f"{phase} distillation diverged at step {step} with lr {lr:g}: {reason}")

    def __reduce__(self):   # crosses process boundaries (Ray) with its fields
        return Diverged, (self.phase, self.step, self.lr, self.loss, self.reason)


def check_divergence(spec: PhaseSpec, state: "PhaseState", factor: float, first: int = 0) -> None:
    """Raise :class:`Diverged` when the mean loss of the steps after ``first`` rose above ``factor``
    times the phase's starting loss (its first step's, measured before any update). ``factor`` 0:
    no check."""
    losses = state.losses
    if factor <= 0 or not losses:
        return
    start = losses[0]
    recent = losses[first:] or losses[-1:]
    mean = sum(recent) / len(recent)
    if mean != mean or mean > factor * start + 1e-12:
        raise Diverged(spec.name, state.step, state.optimizer["param_groups"][0]["lr"] if state.optimizer else spec.lr,
                       mean, f"the loss rose from {start:.4g} to {mean:.4g} (more than {factor:g} x)")


def set_mode(model: nn.Module, adapter, train: bool) -> None:
    adapter.set_train_mode(model, train)


@dataclass
class PhaseState:
    """Everything a distillation phase needs to continue exactly after ``step`` steps.

    ``centroids`` and ``optimizer`` (SGD momentum buffers and the current learning rate)
    are equal on every worker (they see the same averaged gradients); ``buffers`` holds
    each worker's BN buffers in rank order (global phase; empty in the layer-wise phase,
    where the student stays in eval mode); ``losses`` has one loss per step done (the
    mean over the workers). The scheduler position is ``step``.
    """

    step: int = 0
    centroids: dict[str, Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    buffers: list[dict[str, Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain containers (what ``torch.load(weights_only=True)`` reads back)."""
        return {"step": self.step, "centroids": self.centroids, "optimizer": self.optimizer,
                "buffers": self.buffers, "losses": list(self.losses)}

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseState":
        return cls(int(d["step"]), d["centroids"], d["optimizer"], list(d["buffers"]), list(d["losses"]))


def _cpu_copy(obj):
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    return obj


def phase_buffers(student: nn.Module) -> dict[str, Tensor]:
    """The buffers the global phase changes (BN running statistics and counters)."""
    return {k: v for k, v in student.named_buffers() if not k.endswith((".assignments", ".counts"))}


def distill(student: nn.Module, teacher: nn.Module, adapter, spec: PhaseSpec, batches: Iterator,
            reduce_grads: Callable[[list[Tensor]], None] | None = None,
            progress: Callable[[int, float], None] | None = None, state: PhaseState | None = None,
            stop: int | None = None, rank: int = 0) -> PhaseState:
    """SGD steps ``state.step`` (0 without a state) to ``stop`` (default: the end of the phase)
    on this process's batches; ``batches`` must start at that step's batch.

    With a ``state`` the student's centroids, this rank's BN buffers and the optimizer are
    restored from it first, so a phase run in pieces (or resumed from a checkpoint) takes
    exactly the same steps as one run straight through. Returns the state after ``stop``
    with this process's buffers (``buffers`` has one entry) and its local losses of the
    steps run here (``progress(step, loss)`` is called after each step, ``step`` 1-based).
    """
    start = state.step if state is not None else 0
    stop = spec.iterations if stop is None else min(stop, spec.iterations)
    named = centroid_parameters(student, list(spec.layers) if spec.layers is not None else None)
    params = list(named.values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.milestones), spec.gamma)
    if state is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state.centroids[n])
            if spec.train_mode and state.buffers:
                own = phase_buffers(student)
                for k, v in state.buffers[rank].items():
                    own[k].copy_(v)
        if state.optimizer is not None:
            opt.load_state_dict(state.optimizer)
        sched.last_epoch = start   # the multiplied learning rate itself is in the optimizer state
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    set_mode(student, adapter, spec.train_mode)
    keep_in_eval_mode(student, spec.eval_modules)
    losses = []
    try:
        for it in range(start, stop):
            batch = next(batches)
            with torch.no_grad():
                target = adapter.forward(teacher, batch)
            loss = adapter.distill_loss(adapter.forward(student, batch), target)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if reduce_grads is not None:
                reduce_grads([p.grad for p in params])
            # after the reduction every worker sees the same gradients, so all stop together
            if not torch.isfinite(loss) or not all(bool(torch.isfinite(p.grad).all()) for p in params):
                raise Diverged(spec.name, it + 1, opt.param_groups[0]["lr"], float(loss.detach()),
                               "the loss or its gradient is not finite")
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(it + 1, losses[-1])
    finally:
        set_mode(student, adapter, False)
        for p in params:
            p.requires_grad_(False)
    return PhaseState(stop, {n: p.detach().to("cpu", copy=True) for n, p in named.items()},
                      _cpu_copy(opt.state_dict()),
                      [_cpu_copy(phase_buffers(student))] if spec.train_mode else [], losses)


def combine(previous: PhaseState | None, results: list[PhaseState]) -> PhaseState:
    """The phase state after a piece run by ``len(results)`` workers (in rank order): rank 0's
    centroids and optimizer (equal on every rank), every rank's buffers, and the loss history
    extended by the per-step mean of the workers' losses."""
    first = results[0]
    n = len(first.losses)
    mean = [sum(r.losses[i] for r in results) / len(results) for i in range(n)]
    buffers = [r.buffers[0] for r in results] if first.buffers else []
    history = list(previous.losses) if previous is not None else []
    return PhaseState(first.step, first.centroids, first.optimizer, buffers, history + mean)
