"""BatchNorm layers whose normalisation was folded into their affine parameters.

Some checkpoints store BatchNorm with running mean 0 and running variance 1 and
the real normalisation folded into the weight and bias (the reference
implementation's released models import this way). In eval mode such a layer
computes ``y = γ x / sqrt(1 + eps) + β``, exactly the original function. In
train mode it normalises by the batch statistics instead, a function the
network never had: the global distillation phase, which runs the student in
train mode, destroys it.

A layer is *folded* when its running statistics are exactly 0 / 1 while its
input, measured on an example, is not normalised (a freshly initialised layer
whose input happens to be normalised is left alone). Two remedies, chosen by
``finetune.global.folded_bn``:

- ``eval`` (the default): the layer stays in eval mode during the global phase,
  so its function never changes;
- ``unfold``: its running statistics are re-estimated on calibration data and
  its affine parameters rescaled so that the eval-mode function is unchanged
  (checked), after which train mode normalises as the network expects.

``train`` keeps the paper's behaviour (every BN in train mode).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

FOLDED_BN_MODES = ("eval", "unfold", "train")


def has_identity_statistics(bn: _BatchNorm) -> bool:
    """Running mean exactly 0 and running variance exactly 1 in every channel."""
    return (bn.track_running_stats and bn.running_mean is not None
            and bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all()))


@torch.no_grad()
def folded_batchnorms(model: nn.Module, run_example: Callable[[nn.Module], Any],
                      tolerance: float = 0.25) -> dict[str, dict]:
    """The BatchNorm layers of ``model`` that look folded: identity running statistics while the
    input seen by ``run_example(model)`` (eval mode) is not normalised, i.e. some channel's mean is
    further than ``tolerance`` from 0 or the channels' variances are, on average, further than
    ``tolerance`` from 1. Returns ``{name: {"input_mean_abs": float, "input_var_mean": float}}``."""
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and has_identity_statistics(m)}
    if not candidates:
        return {}
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()
            seen[name] = (x.mean(1), x.var(1, unbiased=False))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in candidates.items()]
    was_training = model.training
    try:
        model.eval()
        run_example(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (mean, var) in seen.items():
        mean_abs, var_dev = float(mean.abs().max()), float((var - 1).abs().mean())
        if mean_abs > tolerance or var_dev > tolerance:
            out[name] = {"input_mean_abs": mean_abs, "input_var_mean": float(var.mean())}
    return out


@torch.no_grad()
def unfold_batchnorm(bn: _BatchNorm, mean: Tensor, var: Tensor) -> None:
    """Give a folded ``bn`` the running statistics ``mean`` / ``var`` of its input and rescale its
    affine parameters so that its eval-mode output is unchanged:
    ``γ' = γ sqrt(var + eps) / sqrt(1 + eps)`` and ``β' = β + γ mean / sqrt(1 + eps)``."""
    if not bn.affine:
        raise ValueError("a BatchNorm without affine parameters cannot absorb new statistics")
    if not has_identity_statistics(bn):
        raise ValueError("only a folded BatchNorm (running mean 0, variance 1) can be unfolded")
    eps = bn.eps
    old_scale = bn.weight.detach().double() / (1.0 + eps) ** 0.5
    mean, var = mean.double().to(bn.running_mean.device), var.double().to(bn.running_var.device)
    bn.bias.copy_((bn.bias.double() + old_scale * mean).to(bn.bias.dtype))
    bn.weight.copy_((old_scale * (var + eps).sqrt()).to(bn.weight.dtype))
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))


@torch.no_grad()
def fold_batchnorm(bn: _BatchNorm) -> None:
    """The inverse of :func:`unfold_batchnorm`: move ``bn``'s normalisation into its affine
    parameters and set its running statistics to 0 / 1 (eval-mode function unchanged). This is how
    folded checkpoints come about; tests use it to make one."""
    eps = bn.eps
    scale = bn.weight.detach().double() / (bn.running_var.double() + eps).sqrt()
    bn.bias.copy_((bn.bias.double() - scale * bn.running_mean.double()).to(bn.bias.dtype))
    bn.weight.copy_((scale * (1.0 + eps) ** 0.5).to(bn.weight.dtype))
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


def keep_in_eval_mode(model: nn.Module, names: list[str] | tuple[str, ...]) -> None:
    """Put the modules ``names`` of ``model`` back in eval mode (after ``model.train()``)."""
    for name in names:
        model.get_submodule(name).eval()


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm-like module with an eval-mode affine map ``γ (x - μ) / sqrt(σ² + eps) + β``:
    ``nn.BatchNorm*`` (affine, with running statistics) or a ``FrozenBatchNorm2d`` (torchvision's,
    detectron2's), recognised by name so that the engine imports neither."""
    if isinstance(module, _BatchNorm):
        return module.affine and module.running_var is not None
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(module, k, None), Tensor) for k in ("weight", "bias", "running_var"))


@torch.no_grad()
def batchnorm_consumers(model: nn.Module, run_example: Callable[[nn.Module], Any],
                        names: list[str]) -> dict[str, str]:
    """``{layer: BatchNorm name}`` for each of ``names`` whose output tensor is itself the input of
    a BatchNorm-like module (:func:`is_batchnorm`) when ``run_example(model)`` runs: the module that
    directly normalises the layer's output. Layers without one are left out."""
    from .nn.modules import get_submodule

    outputs: dict[str, Tensor] = {}
    found: dict[str, str] = {}
    handles = []

    def record_output(name):
        def hook(module, args, out):
            if isinstance(out, Tensor):
                outputs.setdefault(name, out)   # kept alive: identity, not ids, is compared
        return hook

    def record_input(bn_name):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                for name, out in outputs.items():
                    if args[0] is out:
                        found.setdefault(name, bn_name)
        return hook

    try:
        for name in names:
            handles.append(get_submodule(model, name).register_forward_hook(record_output(name)))
        for bn_name, module in model.named_modules():
            if is_batchnorm(module):
                handles.append(module.register_forward_pre_hook(record_input(bn_name)))
        run_example(model)
    finally:
        for h in handles:
            h.remove()
    return {n: found[n] for n in names if n in found}
