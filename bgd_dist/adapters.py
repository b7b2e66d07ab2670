"""The adapter protocol: what a task (classification, detection) provides to the engine.

The engine never imports an adapter module by name in code; the pipeline names
the adapter (a short name from :data:`REGISTRY` or ``"package.module:Class"``)
and it is imported here, at run time.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
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
    def write_results(self, path: str | Path) -> Path | None: ...


class DataError(RuntimeError):
    """Input data that cannot be used (an unreadable image, ...); the message names the file. The
    executors pass its message on as it is (no remote traceback)."""


class EvaluatorBase:
    """The default of the evaluator's optional hook: ``write_results(path)`` writes the merged
    predictions to ``path`` (the COCO evaluator writes a results json) or nothing (None)."""

    def write_results(self, path: str | Path) -> Path | None:
        return None


@runtime_checkable
class Adapter(Protocol):
    """Everything the engine needs from a task. Built from ``(model_config, data_config)``.

    - ``build_model()``: the teacher (eval mode, dense). Called once per process
      that needs a replica; students are deep copies with quantized layers.
    - ``arch()``: ``{"factory": "module:function", "kwargs": {...}}`` that rebuilds
      the architecture (no weights) for the compressed file.
    - ``trace(model)``: one forward pass on a small example (for the plan).
    - ``calibration_batches(shard, n_shards, n_images, batch_size, seed, start=0)``:
      unlabelled batches of this shard; shards are disjoint and their union is
      the ``n_images`` calibration images (stream positions from ``start``; an
      adapter without ``start`` works for every run without ``quantize.holdout``).
    - ``train_batches(shard, n_shards, batch_size, seed, start_step=0)``: an endless
      stream of unlabelled, augmented batches of this shard (for distillation),
      from global step ``start_step`` on; step ``k``'s batch depends only on
      ``(seed, k)`` (and the shard), so a resumed phase continues exactly.
    - ``to_device(batch, device)``, ``batch_len(batch)``.
    - ``forward(model, batch)``: what statistics collection runs and distillation
      compares (network outputs, or whatever the loss needs).
    - ``predict(model, batch)``: what the evaluator receives (eval mode).
    - ``distill_loss(student_out, teacher_out)``: scalar loss.
    - ``evaluator()`` and ``eval_batches(shard, n_shards, max_images)``.
    - ``set_train_mode(model, train)``: the mode the student distils in (the global
      phase trains BN statistics); default ``model.train(train)``.
    - ``data_fingerprint()``: what identifies the data for ``--resume`` (JSON-able);
      default the resolved data section.
    - ``skipped_items()``: the files this process left out as unreadable so far
      (``data.on_bad_image: skip``); default none.
    - ``data_paths()``: the files and folders the adapter reads, ``{setting: path}`` (e.g.
      ``{"data.train": "/data/imagenet/train"}``); each stats actor checks them on its node before
      it starts; default none.
    - ``preprocessing()`` and ``class_names()``: what the compressed file records for a
      deployer; default None.

    Which items (and augmentation seeds) a shard of each stream gets is
    :mod:`bgd_dist.sharding`'s rule; an adapter maps them to batches.
    :class:`AdapterBase` provides the defaults of the last six hooks.
    """

    def build_model(self) -> nn.Module: ...
    def arch(self) -> dict: ...
    def trace(self, model: nn.Module) -> Any: ...
    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator[Any]: ...
    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator[Any]: ...
    def to_device(self, batch: Any, device) -> Any: ...
    def batch_len(self, batch: Any) -> int: ...
    def forward(self, model: nn.Module, batch: Any) -> Any: ...
    def predict(self, model: nn.Module, batch: Any) -> Any: ...
    def distill_loss(self, student_out: Any, teacher_out: Any) -> Tensor: ...
    def evaluator(self) -> Evaluator: ...
    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[Any]: ...
    def set_train_mode(self, model: nn.Module, train: bool) -> None: ...
    def data_fingerprint(self) -> Any: ...
    def skipped_items(self) -> list[str]: ...
    def data_paths(self) -> dict[str, str]: ...
    def preprocessing(self) -> dict | None: ...
    def class_names(self) -> list[str] | None: ...


class AdapterBase:
    """Defaults of the adapter's optional hooks (see :class:`Adapter`)."""

    data: Any = None

    def set_train_mode(self, model: nn.Module, train: bool) -> None:
        model.train(train)

    def fresh_model(self) -> nn.Module | None:
        """The architecture a compressed file of this adapter loads into; None: the one the
        file records (its ``arch``)."""
        return None

    def shipped_objects(self) -> list:
        """The user's classes and functions an adapter instance carries to remote workers (their
        modules are pickled by value); adapters built from a config on each worker carry none."""
        return []

    def data_fingerprint(self) -> Any:
        from .config import to_mapping

        return to_mapping(self.data) if dataclasses.is_dataclass(self.data) else self.data

    def skipped_items(self) -> list[str]:
        return []

    def data_paths(self) -> dict[str, str]:
        return {}

    def preprocessing(self) -> dict | None:
        """What a deployer does to an input before the network, recorded in the compressed file
        (e.g. ``{"input_size": [3, 224, 224], "resize": 256, "mean": [...], "std": [...]}``);
        ``input_size`` (C, H, W) is also the example shape of the ONNX export. Default: None."""
        return None

    def class_names(self) -> list[str] | None:
        """The names of the network's output classes, in output order, where the adapter knows
        them (recorded in the compressed file). Default: None."""
        return None


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
    """The adapter named by ``model_config.adapter``, built from the model and data sections;
    an adapter instance (an object holding its model and data, see :mod:`bgd_dist.api`) is
    returned as it is."""
    from .config import ModelConfig

    if not isinstance(model_config, ModelConfig):
        if not isinstance(model_config, Adapter):
            raise TypeError(f"expected a model config or an adapter instance, got {type(model_config).__name__}")
        return model_config
    cls = adapter_class(model_config.adapter)
    return cls(model_config, data_config or {})


def check_architecture(arch: dict) -> None:
    """Fail early, naming ``model.kwargs``, when the architecture factory cannot be called with the
    kwargs a compressed file would store: they must bind to its signature and build a model."""
    import inspect

    if arch["factory"] == "bgd_dist.api:user_model":   # the file needs the user's model to load
        return
    factory, kwargs = import_object(arch["factory"]), dict(arch.get("kwargs", {}))
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"model.kwargs {kwargs}: {e} ({arch['factory']})") from None
    except ValueError:   # no signature to inspect (a builtin): building it below is the check
        pass
    try:
        factory(**kwargs)
    except Exception as e:
        raise ValueError(f"model.kwargs {kwargs}: {arch['factory']} cannot build the architecture with them "
                         f"({type(e).__name__}: {e}); the compressed file could not be loaded") from None


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
