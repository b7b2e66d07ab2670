"""The Python API: compress any ``nn.Module`` with calibration inputs, in one call.

:func:`compress` wraps the user's model and data in a :class:`ModuleAdapter` and
runs the same driver as ``bgd quantize`` (:func:`bgd_dist.runner.run`): same
plan, statistics, codebook fits, distillation, run directory and ``model.bgd``.
The adapter is an object that holds the model and the data, so with the Ray
executor it travels to the actors by value (Ray pickles it with cloudpickle): a
model class defined in a script or inside a function needs no importable module.

Batches. ``data`` is one of

- a tensor ``(N, ...)`` of inputs: cut into batches of ``batch_size``;
- an iterable that can be iterated more than once (a list of batches, a
  ``DataLoader``): its batches are used as they come;
- a callable with no arguments that returns a fresh iterator of batches.

A batch is a tensor (``model(batch)``), a tuple or list whose first entry is the
input (``model(batch[0])``: a ``DataLoader`` over ``(input, label)`` works, the
labels are never read), or a dict of keyword arguments (``model(**batch)``).

Sharding is by batch: shard ``i`` of ``n`` takes the stream's batches ``i, i + n,
...``; the calibration set is the first ``n_calibration`` samples (the stream is
cycled if it is shorter); distillation step ``k`` of shard ``i`` takes batch
``k * n + i`` of the cycled stream. Every worker reads the stream and keeps its
share, so the result does not depend on the executor.

What ``model.bgd`` records as the architecture: ``arch`` when given
(``{"factory": "module:function", "kwargs": {...}}``, e.g.
``torchvision.models:resnet18``), and the file then loads on its own. Otherwise
it records the model's class (:func:`user_model`): it loads by itself only when
that class's module is allow-listed (:func:`bgd_dist.fileformat.register_factory_prefix`)
and the class builds with no arguments; else give the architecture:
``load_compressed(path, model=MyNet())``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import AdapterBase, EvaluatorBase
from .core.layouts import check_block_size, geometry_of
from .plan import Rule, quantizable_layers

USER_MODEL_FACTORY = "bgd_dist.api:user_model"

# The paper's block sizes by layer shape: (3x3 conv, 1x1 conv, linear). A layer of another shape,
# a layer whose row length the block size does not divide, and a layer reading the raw input
# (at most 3 input channels, the paper's uncompressed conv1) stay uncompressed.
PRESETS = {
    "paper-small": {"3x3": 9, "1x1": 4, "linear": 4},
    "paper-large": {"3x3": 18, "1x1": 8, "linear": 4},
}


def preset_rules(model: nn.Module, name: str) -> list[Rule]:
    """One rule per quantizable layer of ``model`` (its exact name) under the preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"rules: unknown preset {name!r}; expected one of {sorted(PRESETS)}, a list of rules, "
                         f"or target_mb")
    sizes, rules = PRESETS[name], []
    for layer_name, module in quantizable_layers(model).items():
        g = geometry_of(module)
        if g.kind == "linear":
            d = sizes["linear"]
        elif g.kernel_size == (3, 3):
            d = sizes["3x3"]
        elif g.kernel_size == (1, 1):
            d = sizes["1x1"]
        else:
            d = None
        if d is not None and g.kind != "linear" and _in_channels(module) <= 3:
            d = None                      # reads the raw input (the paper's uncompressed conv1)
        if d is not None:
            try:
                check_block_size(g, d, layer_name)
            except ValueError:
                d = None
        rules.append(Rule(re.escape(layer_name), skip=True) if d is None
                     else Rule(re.escape(layer_name), block_size=d))
    return rules


def _in_channels(module: nn.Module) -> int:
    return getattr(module, "in_channels", getattr(module, "in_features", 0))


# -- batches -------------------------------------------------------------------------------------
def model_input(model: nn.Module, batch):
    """Call ``model`` on a batch: a tensor, ``(input, ...)`` or a dict of keyword arguments."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _map_tensors(fn, batch):
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(fn, v) for v in batch)
    return batch


def _first_tensor(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        return _first_tensor(v)
    raise TypeError(f"a batch must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}")


def batch_len(batch) -> int:
    return int(_first_tensor(batch).shape[0])


class BatchSource:
    """A re-iterable stream of batches (see the module docstring)."""

    def __init__(self, data, what: str):
        if data is None:
            raise ValueError(f"{what}: no data given")
        if isinstance(data, Iterator) or inspect.isgenerator(data):
            raise TypeError(f"{what}: an iterator can be read only once; pass a list of batches, a DataLoader, "
                            f"or a function that returns a fresh iterator (e.g. lambda: my_batches())")
        if not (isinstance(data, Tensor) or callable(data) or isinstance(data, Iterable)):
            raise TypeError(f"{what}: expected a tensor, an iterable of batches or a callable returning one, "
                            f"got {type(data).__name__}")
        self.data, self.what = data, what

    def batches(self, batch_size: int) -> Iterator:
        """One pass over the batches (a tensor is cut into ``batch_size`` rows)."""
        if isinstance(self.data, Tensor):
            return iter(self.data.split(batch_size))
        it = self.data() if callable(self.data) and not isinstance(self.data, Iterable) else iter(self.data)
        return iter(it)

    def cycled(self, batch_size: int) -> Iterator:
        """The batches, cycled endlessly."""
        while True:
            n = 0
            for b in self.batches(batch_size):
                n += 1
                yield b
            if n == 0:
                raise ValueError(f"{self.what}: the data yields no batches")

    def first(self, batch_size: int):
        for b in self.batches(batch_size):
            return b
        raise ValueError(f"{self.what}: the data yields no batches")


def _truncate(batch, n: int):
    return _map_tensors(lambda t: t[:n], batch)


# -- the adapter ---------------------------------------------------------------------------------
def kl_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """KL(teacher softmax || student log-softmax) over dimension 1, batch mean (the default)."""
    if not isinstance(student_out, Tensor):
        raise TypeError(f"the default distillation loss needs a tensor output, the model returns "
                        f"{type(student_out).__name__}; pass loss=fn(student_out, teacher_out)")
    return F.kl_div(F.log_softmax(student_out.flatten(2) if student_out.dim() > 2 else student_out, 1),
                    F.softmax(teacher_out.flatten(2) if teacher_out.dim() > 2 else teacher_out, 1),
                    reduction="batchmean")


def _tensors_of(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in values for t in _tensors_of(v)]


class OutputEvaluator(EvaluatorBase):
    """Compares a model's outputs with the teacher's on the evaluation batches (mergeable):
    ``output_rel_error`` = sum ||out - teacher||^2 / sum ||teacher||^2 over every output tensor,
    and, for (N, C) outputs, ``top1_agreement`` (argmax equal to the teacher's)."""

    def reset(self) -> None:
        self.err, self.ref, self.agree, self.total = 0.0, 0.0, 0, 0

    def __init__(self):
        self.reset()

    def process(self, batch, outputs) -> None:
        out, ref = outputs
        for o, r in zip(_tensors_of(out), _tensors_of(ref)):
            self.err += float((o.double() - r.double()).pow(2).sum())
            self.ref += float(r.double().pow(2).sum())
        if isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] > 1:
            self.agree += int((out.argmax(1) == ref.argmax(1)).sum())
        self.total += batch_len(batch)

    def state(self) -> dict:
        return {"err": self.err, "ref": self.ref, "agree": self.agree, "total": self.total}

    def merge(self, states: list) -> None:
        for s in states:
            self.err += s["err"]
            self.ref += s["ref"]
            self.agree += s["agree"]
            self.total += s["total"]

    def result(self) -> dict:
        return {"output_rel_error": self.err / max(self.ref, 1e-300), "top1_agreement": self.agree / max(self.total, 1),
                "n_samples": self.total}


class ModuleAdapter(AdapterBase):
    """The adapter protocol over a user's model and data, held by value (see :func:`compress`)."""

    def __init__(self, model: nn.Module, data, eval_data=None, loss: Callable | None = None,
                 arch: dict | None = None, batch_size: int = 32):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__} (a pipeline's adapter is "
                            f"built from its config; this one holds a model)")
        self.model = model
        self.source = BatchSource(data, "data")
        self.eval_source = BatchSource(eval_data, "eval_data") if eval_data is not None else None
        self.loss = loss or kl_loss
        self._arch = arch
        self.batch_size = batch_size
        self._teacher: nn.Module | None = None
        self.data = {"model": type(model).__qualname__, "batch_size": batch_size}   # for --resume

    # -- models ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.model).eval()

    def arch(self) -> dict:
        if self._arch is not None:
            return self._arch
        cls = type(self.model)
        return {"factory": USER_MODEL_FACTORY, "kwargs": {"cls": f"{cls.__module__}:{cls.__qualname__}"}}

    def fresh_model(self) -> nn.Module | None:
        """The architecture ``model.bgd`` loads into (the user's class needs no import)."""
        return copy.deepcopy(self.model)

    def trace(self, model: nn.Module):
        model.eval()
        device = next(itertools.chain(model.parameters(), [torch.zeros(())])).device
        return model_input(model, self.to_device(_truncate(self.source.first(self.batch_size), 2), device))

    # -- data -----------------------------------------------------------------------------------
    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator:
        """The images at positions ``start .. start + n_images - 1`` of the cycled data, batch by
        batch; the ``k``-th batch of that window goes to shard ``k % n_shards``."""
        first, end, k = 0, start + n_images, 0
        for batch in self.source.cycled(batch_size):
            if first >= end:
                return
            n = batch_len(batch)
            lo, hi = max(start, first) - first, min(end, first + n) - first
            first += n
            if hi <= lo:
                continue
            if k % n_shards == shard:
                yield _map_tensors(lambda t: t[lo:hi], batch) if (lo, hi) != (0, n) else batch
            k += 1

    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator:
        """A tensor: step ``k``'s global batch is rows ``[k * B, (k + 1) * B)`` of the cycled tensor
        (``B = batch_size * n_shards``) and shard ``i`` keeps its slice ``i``, so a step does not
        depend on the number of workers. Other data: shard ``i`` of step ``k`` takes the whole
        batch ``k * n_shards + i`` of the cycled stream."""
        data = self.source.data
        if isinstance(data, Tensor):
            total, step = batch_size * n_shards, start_step
            while True:
                rows = (torch.arange(shard * batch_size, (shard + 1) * batch_size) + step * total) % len(data)
                yield data[rows]
                step += 1
        for position, batch in enumerate(self.source.cycled(batch_size)):
            step, owner = divmod(position, n_shards)
            if step >= start_step and owner == shard:
                yield batch

    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator:
        if self.eval_source is None:
            raise ValueError("evaluation needs eval_data")
        seen = 0
        for position, batch in enumerate(self.eval_source.batches(self.batch_size)):
            if max_images is not None and seen >= max_images:
                return
            n = batch_len(batch) if max_images is None else min(batch_len(batch), max_images - seen)
            seen += n
            if position % n_shards == shard:
                yield _truncate(batch, n)

    def to_device(self, batch, device):
        return _map_tensors(lambda t: t.to(device), batch)

    def batch_len(self, batch) -> int:
        return batch_len(batch)

    # -- model calls ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch):
        return model_input(model, batch)

    def predict(self, model: nn.Module, batch):
        if self._teacher is None:
            self._teacher = self.build_model()
        teacher = self._teacher.to(_first_tensor(batch).device)
        return model_input(model, batch), model_input(teacher, batch)

    def distill_loss(self, student_out, teacher_out) -> Tensor:
        return self.loss(student_out, teacher_out)

    def evaluator(self) -> OutputEvaluator:
        return OutputEvaluator()

    def shipped_objects(self) -> list:
        """What this adapter carries of the user's code (the Ray executor ships its modules by value)."""
        objs = [type(m) for m in self.model.modules()] + [self.loss]
        for source in (self.source, self.eval_source):
            if source is not None and not isinstance(source.data, Tensor):
                objs += [source.data, getattr(source.data, "dataset", None), getattr(source.data, "collate_fn", None)]
        return [o for o in objs if o is not None]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_teacher"] = None
        return state


def user_model(cls: str) -> nn.Module:
    """The architecture factory recorded for a user's own model class: builds ``cls()`` when its
    module is allow-listed (:func:`bgd_dist.fileformat.register_factory_prefix`) and the class
    needs no arguments; otherwise says to pass the architecture to ``load_compressed``."""
    from .fileformat import factory_prefixes, resolve_factory

    hint = (f"this file was written from a model of class {cls!r}, which it cannot rebuild by itself; "
            f"load it with load_compressed(path, model=<a {cls.rsplit(':', 1)[-1].rsplit('.', 1)[-1]} instance>)")
    module_name, _, qualname = cls.partition(":")
    if module_name == "__main__" or "<locals>" in qualname or "." in qualname:
        raise ValueError(hint)
    if not any(module_name == p or module_name.startswith(p + ".") for p in factory_prefixes()):
        raise ValueError(f"{hint} (or allow-list its module with register_factory_prefix({module_name!r}))")
    try:
        return resolve_factory(cls)()
    except TypeError as e:
        raise ValueError(f"{hint} ({cls}() needs arguments: {e})") from None


# -- the entry point -----------------------------------------------------------------------------
def compress(model: nn.Module, data, out: str | Path, *, rules: str | list = "paper-small",
             target_mb: float | None = None, objective: str = "paper", n_centroids: int = 256, n_iter: int = 100,
             n_calibration: int = 1024, batch_size: int = 32, distill: bool | dict = False,
             loss: Callable | None = None, eval_data=None, max_eval: int | None = None,
             executor: str | Any = "serial", num_workers: int = 1, address: str | None = None,
             arch: dict | None = None, seed: int = 0, resume: bool = False, progress: bool = True,
             name: str = "model", quantize: dict | None = None) -> tuple[nn.Module, dict]:
    """Compress ``model`` with the calibration inputs ``data``; returns ``(compressed model, report)``.

    - ``rules``: a preset (``"paper-small"``: 3x3 d=9, 1x1 d=4, linear d=4; ``"paper-large"``:
      18 / 8 / 4), or a list of rules (dicts with the pipeline YAML's keys, or :class:`Rule`).
      ``target_mb`` chooses (d, K) per layer under a size budget instead (among the layers the
      rules quantize).
    - ``objective``: ``paper`` (pooled Gram), ``weights`` (classic PQ) or ``hessian``.
    - ``quantize``: more keys of the pipeline's ``quantize`` section, as in the YAML (e.g.
      ``{"bias_correction": True, "permute": True, "holdout": 0.1, "hessian": {"target": "teacher"}}``);
      they override the arguments above, and an unknown key is an error naming it.
    - ``distill``: False, True (layer-wise and global distillation with the pipelines' defaults
      shortened to 100 iterations each), or a dict with the ``finetune`` section's keys
      (``{"layerwise": {...}, "global": {...}}``). ``loss(student_out, teacher_out)``: the
      distillation loss (default: KL divergence of the softmax outputs).
    - ``eval_data``: batches to compare the compressed model's outputs with the original's
      (``output_rel_error``, ``top1_agreement``); the report's ``metrics_after`` is measured on
      ``model.bgd`` as it loads.
    - ``executor``: ``"serial"`` (this process), ``"ray"`` (``num_workers`` actors; a local
      cluster, or ``address``), or an :class:`~bgd_dist.executor.Executor` instance.
    - ``out``: the run directory (``model.bgd``, ``report.json``, ``plan.json``, ``log.jsonl``).
    - ``arch``: ``{"factory": "module:function", "kwargs": {...}}`` that rebuilds the
      architecture, recorded in ``model.bgd`` so that it loads without the model's class.
    """
    from .config import from_mapping, pipeline_from_dict, to_mapping
    from .fileformat import load_compressed
    from .runner import make_executor, run

    if isinstance(rules, str):
        rule_list = preset_rules(model, rules)
    else:
        rule_list = [r if isinstance(r, Rule) else from_mapping(Rule, r, f"rules[{i}]") for i, r in enumerate(rules)]
    if distill is True:
        distill = {"layerwise": {"iterations": 100}, "global": {"epochs": 1, "iterations_per_epoch": 100}}
    phases = {"layerwise": {"enabled": False}, "global": {"enabled": False}}
    if distill:
        unknown = set(distill) - set(phases)
        if unknown:
            raise ValueError(f"distill: unknown keys {sorted(unknown)}; expected layerwise, global")
        for phase in phases:
            phases[phase] = {"enabled": phase in distill, "batch_size": batch_size * num_workers,
                             **distill.get(phase, {})}
    if not isinstance(executor, str):
        num_workers = executor.num_shards
    kind = executor if isinstance(executor, str) else "serial"
    cfg = pipeline_from_dict({
        "name": name,
        "model": {"adapter": "bgd_dist.api:ModuleAdapter", "arch": type(model).__qualname__},
        "quantize": {"rules": [to_mapping(r) for r in rule_list], "n_centroids": n_centroids, "n_iter": n_iter,
                     "objective": objective, "target_mb": target_mb, "n_calibration": n_calibration,
                     "batch_size": batch_size, "seed": seed, **(quantize or {})},
        "finetune": phases,
        "executor": {"kind": kind, "num_workers": num_workers, "address": address},
        "eval": {"max_images": max_eval},
    })
    adapter = ModuleAdapter(model, data, eval_data, loss, arch, batch_size)
    ex = make_executor(cfg) if isinstance(executor, str) else executor
    try:
        report = run(cfg, out, ex, resume=resume, do_eval=eval_data is not None, progress=progress,
                     adapter=adapter)
    finally:
        if isinstance(executor, str):
            ex.close()
    return load_compressed(Path(out) / "model.bgd", model=copy.deepcopy(model)), report
