"""The adapter protocol: what a task (classification, detection) provides to the engine.

The engine never imports an adapter module by name in code; the pipeline names
the adapter (a short name from :data:`REGISTRY` or ``"package.module:Class"``)
and it is imported here, at run time.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Protocol, runtime_checkable

from torch import Tensor, nn

REGISTRY = {
    "classification": "classification.adapter:ClassificationAdapter",
    "digits": "classification.digits:DigitsAdapter",
    "maskrcnn": "detection.adapter:MaskRCNNAdapter",
    "detectron2": "detection.detectron2_adapter:Detectron2Adapter",
}


@runtime_checkable
class Evaluator(Protocol):
    """After detectron2's DatasetEvaluator, plus state()/merge() for shards."""

    def reset(self) -> None: ...
    def process(self, batch: Any, outputs: Any) -> None: ...
    def state(self) -> Any: ...
    def merge(self, states: list) -> None: ...
    def result(self) -> dict: ...


@runtime_checkable
class Adapter(Protocol):
    """Everything the engine needs from a task. Built from ``(model_config, data_config)``.

    - ``build_model()``: the teacher (eval mode, dense). Called once per process
      that needs a replica; students are deep copies with quantized layers.
    - ``arch()``: ``{"factory": "module:function", "kwargs": {...}}`` that rebuilds
      the architecture (no weights) for the compressed file.
    - ``trace(model)``: one forward pass on a small example (for the plan).
    - ``calibration_batches(shard, n_shards, n_images, batch_size, seed)``:
      unlabelled batches of this shard; shards are disjoint and their union is
      the ``n_images`` calibration images.
    - ``train_batches(shard, n_shards, batch_size, seed)``: an endless stream of
      unlabelled, augmented batches of this shard (for distillation).
    - ``to_device(batch, device)``, ``batch_len(batch)``.
    - ``forward(model, batch)``: what statistics collection runs and distillation
      compares (network outputs, or whatever the loss needs).
    - ``predict(model, batch)``: what the evaluator receives (eval mode).
    - ``distill_loss(student_out, teacher_out)``: scalar loss.
    - ``evaluator()`` and ``eval_batches(shard, n_shards, max_images)``.
    - ``data_paths()``: the files and folders the adapter reads, ``{setting: path}`` (e.g.
      ``{"data.train": "/data/imagenet/train"}``); each stats actor checks them on its node before
      it starts. Optional (see :func:`data_paths`): an adapter without it declares none.
    """

    def build_model(self) -> nn.Module: ...
    def arch(self) -> dict: ...
    def trace(self, model: nn.Module) -> Any: ...
    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int) -> Iterator[Any]: ...
    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int) -> Iterator[Any]: ...
    def to_device(self, batch: Any, device) -> Any: ...
    def batch_len(self, batch: Any) -> int: ...
    def forward(self, model: nn.Module, batch: Any) -> Any: ...
    def predict(self, model: nn.Module, batch: Any) -> Any: ...
    def distill_loss(self, student_out: Any, teacher_out: Any) -> Tensor: ...
    def evaluator(self) -> Evaluator: ...
    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[Any]: ...
    def data_paths(self) -> dict[str, str]: ...


def data_paths(adapter) -> dict[str, str]:
    """The adapter's ``data_paths()``, or none if it does not declare any."""
    method = getattr(adapter, "data_paths", None)
    return dict(method()) if method is not None else {}


def import_object(path: str):
    """``"package.module:attr"`` -> the attribute."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import {module_name!r} (for {path!r}): {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def adapter_class(name: str):
    return import_object(REGISTRY.get(name, name))


def make_adapter(model_config, data_config: dict | None = None):
    """The adapter named by ``model_config.adapter``, built from the model and data sections."""
    cls = adapter_class(model_config.adapter)
    return cls(model_config, data_config or {})


def build_architecture(arch: dict) -> nn.Module:
    """The model described by ``{"factory": "module:function", "kwargs": {...}}``, without weights."""
    return import_object(arch["factory"])(**arch.get("kwargs", {}))


def plan_for(config, model: nn.Module | None = None, adapter=None):
    """The plan of a pipeline: trace the adapter's example through ``model`` (default: the
    architecture without weights) and apply the pipeline's rules."""
    from .plan import build_plan

    adapter = adapter or make_adapter(config.model, config.data)
    if model is None:
        model = build_architecture(adapter.arch())
    q = config.quantize
    return build_plan(model, q.rules, adapter.trace, q.n_centroids, q.objective, q.clamp)
