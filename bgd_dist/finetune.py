"""Distillation of the centroids (METHOD.md §4), one process's share of it.

Layer-wise: only the stage's centroids train, the student stays in eval mode.
Global: all centroids train, the student is in train mode (BN running
statistics update); BN affine parameters, biases and uncompressed layers stay
frozen. The loss and the forward come from the adapter. With several workers
each computes the gradient of its part of the global batch and the gradients
are averaged (``reduce_grads``), which equals one process on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def set_mode(model: nn.Module, adapter, train: bool) -> None:
    adapter.set_train_mode(model, train)


def distill(student: nn.Module, teacher: nn.Module, adapter, spec: PhaseSpec, batches: Iterator,
            reduce_grads: Callable[[list[Tensor]], None] | None = None,
            progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Run ``spec.iterations`` SGD steps on this process's batches; returns the local losses."""
    if spec.iterations <= 0:
        return []
    params = list(centroid_parameters(student, list(spec.layers) if spec.layers is not None else None).values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.milestones), spec.gamma)
    teacher.eval()
    set_mode(student, adapter, spec.train_mode)
    keep_in_eval_mode(student, spec.eval_modules)
    losses = []
    try:
        for it in range(spec.iterations):
            batch = next(batches)
            with torch.no_grad():
                target = adapter.forward(teacher, batch)
            loss = adapter.distill_loss(adapter.forward(student, batch), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{spec.name} distillation: non-finite loss at iteration {it}")
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if reduce_grads is not None:
                reduce_grads([p.grad for p in params])
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(it, losses[-1])
    finally:
        set_mode(student, adapter, False)
        for p in params:
            p.requires_grad_(False)
    return losses
