"""Distillation of the centroids (METHOD.md §4), one process's share of it.

Layer-wise: only the stage's centroids train, the student stays in eval mode.
Global: all centroids train, the student is in train mode (BN running
statistics update); BN affine parameters, biases and uncompressed layers stay
frozen. The loss and the forward come from the adapter. With several workers
each computes the gradient of its part of the global batch and the gradients
are averaged (``reduce_grads``), which equals one process on the whole batch.

Options (off by default, the paper trains centroids only): a phase may also
train named extra parameters (``PhaseSpec.params``: BatchNorm affine parameters
and biases, chosen by :func:`trainable_parameters`), without weight decay; they
travel in :class:`PhaseState` like the centroids. The layer-wise phases may
reuse the teacher's outputs (:class:`TeacherCache`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .batchnorm import keep_in_eval_mode
from .student import centroid_parameters

log = logging.getLogger("bgd.distill")
MB = 2 ** 20


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
    params: tuple[str, ...] = ()           # extra parameters that train (BN affine, biases), no weight decay
    teacher_cache_mb: float = 0.0          # > 0: cache the teacher's outputs per step on each worker (results equal)


def layerwise_spec(cfg, layers, seed: int = 0, params: tuple[str, ...] = ()) -> PhaseSpec:
    return PhaseSpec("layerwise", cfg.iterations, cfg.effective_lr, cfg.momentum, cfg.weight_decay, cfg.batch_size,
                     train_mode=False, layers=tuple(layers), seed=seed, params=tuple(params),
                     teacher_cache_mb=float(cfg.teacher_cache_mb) if cfg.reuse_teacher else 0.0)


def global_spec(cfg, seed: int = 0, eval_modules: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> PhaseSpec:
    total = cfg.epochs * cfg.iterations_per_epoch
    step = cfg.lr_step_epochs * cfg.iterations_per_epoch
    milestones = tuple(range(step, total, step)) if step > 0 else ()
    return PhaseSpec("global", total, cfg.effective_lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, milestones,
                     cfg.lr_gamma, train_mode=True, layers=None, seed=seed, eval_modules=tuple(eval_modules),
                     params=tuple(params))


# -- what trains besides the centroids -------------------------------------------------------------
def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (detection backbones): affine parameters held as buffers."""
    return type(module).__name__ == "FrozenBatchNorm2d"


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(module)


def batchnorms_after(model: nn.Module, run_example: Callable[[nn.Module], Any]) -> dict[str, str]:
    """``{layer: batchnorm}`` for every leaf module whose output tensor is exactly the input of a
    BatchNorm in ``run_example(model)`` (eval mode): a conv and the BN right after it
    (:func:`bgd_dist.batchnorm.batchnorm_consumers` over every leaf module)."""
    from .batchnorm import batchnorm_consumers

    leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    was_training = model.training
    try:
        model.eval()
        return batchnorm_consumers(model, run_example, leaves)
    finally:
        model.train(was_training)


def _has_bias(module: nn.Module) -> bool:
    from .nn.modules import PQLayer

    return (isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, PQLayer))
            and isinstance(getattr(module, "bias", None), nn.Parameter))


def trainable_parameters(model: nn.Module, layers: list[str] | None, train_bn: bool, train_bias: bool,
                         bn_after: dict[str, str] | None = None) -> tuple[tuple[str, ...], list[str]]:
    """The extra parameters a phase trains, in ``model.named_parameters()`` order, and the
    FrozenBatchNorm2d layers left out (their affine parameters are buffers: they stay frozen).

    Global (``layers`` None): ``train_bn`` every BatchNorm's weight and bias, ``train_bias`` the
    bias of every conv and linear layer, quantized or dense. Layer-wise: the biases of ``layers``
    and the BatchNorm right after each of them (``bn_after``, see :func:`batchnorms_after`)."""
    if layers is None:
        bn_names = [n for n, m in model.named_modules() if _is_batchnorm(m)] if train_bn else []
        bias_names = [n for n, m in model.named_modules() if _has_bias(m)] if train_bias else []
    else:
        bn_names = [bn_after[l] for l in layers if l in (bn_after or {})] if train_bn else []
        bias_names = [l for l in layers if _has_bias(model.get_submodule(l))] if train_bias else []
    frozen = [n for n in bn_names if is_frozen_batchnorm(model.get_submodule(n))]
    wanted = set()
    for n in bn_names:
        m = model.get_submodule(n)
        if not is_frozen_batchnorm(m) and getattr(m, "affine", False):
            wanted.update((f"{n}.weight", f"{n}.bias"))
    wanted.update(f"{n}.bias" for n in bias_names)
    return tuple(n for n, _ in model.named_parameters() if n in wanted), frozen


def extra_parameters(model: nn.Module, names: tuple[str, ...] | list[str]) -> dict[str, nn.Parameter]:
    own = dict(model.named_parameters())
    missing = [n for n in names if n not in own]
    if missing:
        raise KeyError(f"parameters not in the student: {missing}")
    return {n: own[n] for n in names}


# -- teacher outputs reused across the layer-wise phases ------------------------------------------
def output_nbytes(obj) -> int:
    """Bytes of the tensors in a forward's output (tensors, mappings, sequences, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return 0
    if isinstance(obj, dict):
        return sum(output_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(output_nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(output_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


class TeacherCache:
    """The teacher's outputs by step of one batch stream (``key``: seed, batch, rank, world), held by
    the worker that computed them, up to ``limit`` bytes; later steps run the teacher again (one
    log line). The teacher never changes in a run and step k's batch depends only on (seed, k),
    so a cached output is the one the teacher would compute: results do not change."""

    def __init__(self):
        self.key = None
        self.outputs: dict[int, Any] = {}
        self.nbytes = 0
        self.limit = 0
        self.full = False
        self.hits = self.misses = 0

    def bind(self, key, limit_bytes: float) -> None:
        if key != self.key:
            self.key, self.outputs, self.nbytes, self.full = key, {}, 0, False
        self.limit = limit_bytes

    def get(self, step: int, compute: Callable[[], Any]) -> Any:
        if step in self.outputs:
            self.hits += 1
            return self.outputs[step]
        out = compute()
        self.misses += 1
        size = output_nbytes(out)
        if self.nbytes + size <= self.limit:
            self.outputs[step] = out
            self.nbytes += size
        elif not self.full:
            self.full = True
            log.info("teacher output cache full at %.1f MB (%d steps; finetune.layerwise.teacher_cache_mb = %g): "
                     "steps from %d on run the teacher each time", self.nbytes / MB, len(self.outputs),
                     self.limit / MB, step)
        return out


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
    mean over the workers). The scheduler position is ``step``. ``params`` holds the extra
    parameters that train (``PhaseSpec.params``), equal on every worker like the centroids.
    """

    step: int = 0
    centroids: dict[str, Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    buffers: list[dict[str, Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain containers (what ``torch.load(weights_only=True)`` reads back)."""
        d = {"step": self.step, "centroids": self.centroids, "optimizer": self.optimizer,
             "buffers": self.buffers, "losses": list(self.losses)}
        if self.params:
            d["params"] = self.params
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseState":
        return cls(int(d["step"]), d["centroids"], d["optimizer"], list(d["buffers"]), list(d["losses"]),
                   dict(d.get("params") or {}))


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
            stop: int | None = None, rank: int = 0,
            targets: Callable[[int, Callable[[], Any]], Any] | None = None) -> PhaseState:
    """SGD steps ``state.step`` (0 without a state) to ``stop`` (default: the end of the phase)
    on this process's batches; ``batches`` must start at that step's batch.

    With a ``state`` the student's centroids, this rank's BN buffers and the optimizer are
    restored from it first, so a phase run in pieces (or resumed from a checkpoint) takes
    exactly the same steps as one run straight through. Returns the state after ``stop``
    with this process's buffers (``buffers`` has one entry) and its local losses of the
    steps run here (``progress(step, loss)`` is called after each step, ``step`` 1-based).
    ``targets(step, compute)``: the teacher's output of a step (e.g. from a :class:`TeacherCache`);
    default ``compute()``.
    """
    start = state.step if state is not None else 0
    stop = spec.iterations if stop is None else min(stop, spec.iterations)
    named = centroid_parameters(student, list(spec.layers) if spec.layers is not None else None)
    extra = extra_parameters(student, spec.params)
    params = list(named.values()) + list(extra.values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if extra:   # BN affine parameters and biases: no weight decay
        groups = [{"params": list(named.values())}, {"params": list(extra.values()), "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.milestones), spec.gamma)
    if state is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state.centroids[n])
            for n, p in extra.items():
                p.copy_(state.params[n])
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
                target = (adapter.forward(teacher, batch) if targets is None
                          else targets(it, lambda: adapter.forward(teacher, batch)))
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
                      [_cpu_copy(phase_buffers(student))] if spec.train_mode else [], losses,
                      {n: p.detach().to("cpu", copy=True) for n, p in extra.items()})


def combine(previous: PhaseState | None, results: list[PhaseState]) -> PhaseState:
    """The phase state after a piece run by ``len(results)`` workers (in rank order): rank 0's
    centroids and optimizer (equal on every rank), every rank's buffers, and the loss history
    extended by the per-step mean of the workers' losses."""
    first = results[0]
    n = len(first.losses)
    mean = [sum(r.losses[i] for r in results) / len(results) for i in range(n)]
    buffers = [r.buffers[0] for r in results] if first.buffers else []
    history = list(previous.losses) if previous is not None else []
    return PhaseState(first.step, first.centroids, first.optimizer, buffers, history + mean, first.params)
