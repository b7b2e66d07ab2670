"""Diagnostics of a compressed classifier against its teacher (tests and benchmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgd_dist.nn.modules import get_submodule, pq_layers


def _apply(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``module``'s linear map with ``weight`` instead of its own, without bias."""
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, None, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"padding mode {module.padding_mode!r} is not supported here")
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    raise TypeError(f"not a quantizable layer: {type(module).__name__}")


@torch.no_grad()
def layer_output_errors(teacher: nn.Module, compressed: nn.Module, inputs: Tensor) -> dict[str, tuple[float, float]]:
    """Per quantized layer of ``compressed``: ``(||W x - Ŵ x||², ||W x||²)`` summed over the layer's
    inputs ``x`` *in the teacher* on the images ``inputs`` ((N, C, H, W)).

    This is the quantity the paper's objective minimises (METHOD.md §2), measured
    on the same inputs for every compressed model, so objectives can be compared.
    """
    names = list(pq_layers(compressed))
    captured: dict[str, Tensor] = {}
    handles = [get_submodule(teacher, n).register_forward_pre_hook(
        lambda m, args, n=n: captured.__setitem__(n, args[0].detach())) for n in names]
    was_training = teacher.training
    try:
        teacher.eval()
        teacher(inputs)
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    out = {}
    for n in names:
        dense = get_submodule(teacher, n)
        w = dense.weight.detach()
        w_hat = get_submodule(compressed, n).weight.detach().to(w.dtype)
        x = captured[n]
        out[n] = (float(_apply(dense, x, w - w_hat).double().pow(2).sum()),
                  float(_apply(dense, x, w).double().pow(2).sum()))
    return out


def relative_output_error(errors: dict[str, tuple[float, float]]) -> float:
    """Mean over layers of ``||W x - Ŵ x||² / ||W x||²`` (see :func:`layer_output_errors`)."""
    ratios = [err / ref for err, ref in errors.values() if ref > 0]
    return sum(ratios) / len(ratios) if ratios else 0.0
