"""Students as plain data: rebuild a (partly) quantized model from a state dict.

What crosses a process boundary is ``(state_dict, quantized layer names)``;
the receiving side turns its own dense replica into the same student.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .core.kmeans import Codebook
from .nn.modules import PQLayer, get_submodule, pq_layers, quantized_from_dense, set_submodule


def quantized_names(model: nn.Module) -> list[str]:
    return list(pq_layers(model))


def student_state(model: nn.Module) -> dict:
    """``{"state": state_dict on CPU, "quantized": [names]}``: everything a replica needs."""
    return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "quantized": quantized_names(model)}


def quantize_like(model: nn.Module, names: list[str], state: dict) -> nn.Module:
    """Swap the dense layers ``names`` of ``model`` for quantized ones whose codebooks come
    from ``state`` (``<name>.centroids`` / ``<name>.assignments``), in place."""
    for name in names:
        module = get_submodule(model, name)
        if isinstance(module, PQLayer):
            continue
        codebook = Codebook(state[f"{name}.centroids"], state[f"{name}.assignments"], ())
        set_submodule(model, name, quantized_from_dense(module, codebook, name))
    return model


def load_student(base: nn.Module, payload: dict, copy_base: bool = True) -> nn.Module:
    """The student described by ``payload`` (see :func:`student_state`), built on ``base``."""
    model = copy.deepcopy(base) if copy_base else base
    quantize_like(model, payload["quantized"], payload["state"])
    model.load_state_dict(payload["state"], strict=True)
    return model


def centroid_parameters(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """The centroid parameters of the quantized layers ``names`` (all if None), by layer name."""
    layers = pq_layers(model)
    if names is None:
        names = list(layers)
    missing = [n for n in names if n not in layers]
    if missing:
        raise KeyError(f"layers not quantized: {missing}")
    return {n: layers[n].centroids for n in names}
