"""The per-layer plan: which layers are quantized, how, and in which stages.

Computed once by tracing one forward pass, written to ``plan.json`` and reused
by every later step (sizing, statistics, fitting, export), so block size and
number of centroids are never re-derived.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .core.kmeans import clamp_n_centroids
from .core.layouts import LayerGeometry, check_block_size, geometry_of
from .objectives import NAMES as OBJECTIVES

log = logging.getLogger(__name__)

PLAN_VERSION = 1
QUANTIZABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True)
class Rule:
    """One ordered per-layer rule; the first rule that matches a layer decides.

    ``match`` is a regular expression matched with ``re.fullmatch`` on the
    qualified module name; ``kind`` (conv2d, conv_transpose2d, linear) and
    ``kernel`` ([kh, kw]) further restrict what the rule applies to.
    """

    match: str
    skip: bool = False
    kind: str | None = None
    kernel: tuple[int, int] | None = None
    block_size: int | None = None
    n_centroids: int | None = None
    objective: str | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.match)
        except re.error as e:
            raise ValueError(f"rule match {self.match!r} is not a valid regular expression: {e}") from None
        if self.kernel is not None:
            object.__setattr__(self, "kernel", tuple(int(k) for k in self.kernel))
            if len(self.kernel) != 2:
                raise ValueError(f"rule {self.match!r}: kernel must be [kh, kw], got {self.kernel}")
        if self.kind is not None and self.kind not in ("conv2d", "conv_transpose2d", "linear"):
            raise ValueError(f"rule {self.match!r}: unknown kind {self.kind!r}")
        if not self.skip and self.block_size is None:
            raise ValueError(f"rule {self.match!r}: block_size is required unless skip is true")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"rule {self.match!r}: block_size must be >= 1, got {self.block_size}")
        if self.n_centroids is not None and self.n_centroids < 1:
            raise ValueError(f"rule {self.match!r}: n_centroids (K) must be >= 1, got {self.n_centroids}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"rule {self.match!r}: unknown objective {self.objective!r}; expected one of {OBJECTIVES}")

    def matches(self, name: str, geometry: LayerGeometry) -> bool:
        if re.fullmatch(self.match, name) is None:
            return False
        if self.kind is not None and self.kind != geometry.kind:
            return False
        if self.kernel is not None and (geometry.kind == "linear" or self.kernel != geometry.kernel_size):
            return False
        return True


@dataclass(frozen=True)
class LayerPlan:
    name: str
    geometry: LayerGeometry
    skip: bool
    block_size: int | None = None
    n_centroids: int | None = None          # after the clamp rule
    n_centroids_requested: int | None = None
    objective: str = "paper"
    stage: int | None = None
    order: int = 0                          # position in execution order
    traced: bool = True                     # False: not reached by the trace, appended in registration order

    @property
    def n_subvectors(self) -> int:
        return self.geometry.n_subvectors(self.block_size, self.name)

    def to_dict(self) -> dict:
        return {"name": self.name, "geometry": self.geometry.to_dict(), "skip": self.skip,
                "block_size": self.block_size, "n_centroids": self.n_centroids,
                "n_centroids_requested": self.n_centroids_requested, "objective": self.objective,
                "stage": self.stage, "order": self.order, "traced": self.traced}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        d = dict(d)
        d["geometry"] = LayerGeometry.from_dict(d["geometry"])
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    layers: tuple[LayerPlan, ...]
    stages: tuple[tuple[str, ...], ...]
    version: int = PLAN_VERSION
    _index: dict = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {l.name: l for l in self.layers})

    def layer(self, name: str) -> LayerPlan:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in the plan") from None

    @property
    def quantized(self) -> list[LayerPlan]:
        return [l for l in self.layers if not l.skip]

    def to_dict(self) -> dict:
        return {"version": self.version, "layers": [l.to_dict() for l in self.layers],
                "stages": [list(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        return cls(tuple(LayerPlan.from_dict(l) for l in d["layers"]), tuple(tuple(s) for s in d["stages"]))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid plan file ({e})") from None


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d, ConvTranspose2d and Linear modules by qualified name (registration order)."""
    from .nn.modules import PQLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE + (PQLayer,))}


def trace_execution(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[list[str], dict[str, int]]:
    """Run ``run(model)`` once with hooks; return the layers in order of first call and,
    per layer, an id of the input tensor of that first call (equal ids = same tensor)."""
    layers = quantizable_layers(model)
    order: list[str] = []
    input_ids: dict[str, int] = {}
    keep_alive = []  # hold inputs so ids are not reused during the trace

    def hook(name):
        def fn(module, args):
            if name not in input_ids:
                order.append(name)
                input_ids[name] = id(args[0])
                keep_alive.append(args[0])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return order, input_ids


def resolve_layer(name: str, geometry: LayerGeometry, rules: Iterable[Rule], default_n_centroids: int,
                  default_objective: str = "paper", clamp: bool = True) -> LayerPlan:
    for rule in rules:
        if rule.matches(name, geometry):
            break
    else:
        raise ValueError(
            f"no rule matches layer {name!r} ({geometry.kind}, weight {tuple(geometry.weight_shape)}); "
            f"add a rule for it (use skip: true to leave it uncompressed)"
        )
    if rule.skip:
        return LayerPlan(name, geometry, True)
    check_block_size(geometry, rule.block_size, name)
    requested = rule.n_centroids or default_n_centroids
    n_sub = geometry.n_subvectors(rule.block_size, name)
    k = clamp_n_centroids(requested, n_sub) if clamp else requested
    return LayerPlan(name, geometry, False, rule.block_size, k, requested, rule.objective or default_objective)


def check_rules_match(rules: list[Rule], geometries: dict[str, LayerGeometry]) -> None:
    """A rule that matches no layer at all is an error naming it (a typo such as ``conv_1``
    would otherwise leave the layer it meant to the rules after it)."""
    for i, rule in enumerate(rules):
        if not any(rule.matches(n, g) for n, g in geometries.items()):
            filters = "".join(f", {k}: {getattr(rule, k)!r}" for k in ("kind", "kernel") if getattr(rule, k) is not None)
            names = list(geometries)
            raise ValueError(f"quantize.rules[{i}] {{match: {rule.match!r}{filters}}} matches no layer of the model "
                             f"(its layers: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")


def build_plan(model: nn.Module, rules: Iterable[Rule], run: Callable[[nn.Module], Any] | None = None,
               default_n_centroids: int = 256, default_objective: str = "paper", clamp: bool = True) -> Plan:
    """The plan of ``model`` under ``rules``.

    ``run(model)`` performs one forward pass (e.g. ``lambda m: m(example_batch)``);
    it gives the execution order and the stages (layers reading the same input
    tensor share a stage). Without it, registration order is used and every
    layer is its own stage. Layers the trace does not reach are appended in
    registration order (``traced=False``) with a warning.
    """
    rules = list(rules)
    layers = quantizable_layers(model)
    check_rules_match(rules, {n: geometry_of(m) for n, m in layers.items()})
    if run is not None:
        was_training = model.training
        order, input_ids = trace_execution(model, run)
        model.train(was_training)
    else:
        order, input_ids = list(layers), {}
    untraced = [n for n in layers if n not in input_ids] if run is not None else []
    if untraced:
        log.warning("%d layers were not reached by the trace and are appended in registration order: %s",
                    len(untraced), ", ".join(untraced))
    entries: list[LayerPlan] = []
    stage_of_input: dict[int, int] = {}
    stages: list[list[str]] = []
    for position, name in enumerate(order + untraced):
        lp = resolve_layer(name, geometry_of(layers[name]), rules, default_n_centroids, default_objective, clamp)
        stage = None
        if not lp.skip:
            key = input_ids.get(name)
            if key is not None and key in stage_of_input:
                stage = stage_of_input[key]
                stages[stage].append(name)
            else:
                stage = len(stages)
                stages.append([name])
                if key is not None:
                    stage_of_input[key] = stage
        entries.append(LayerPlan(lp.name, lp.geometry, lp.skip, lp.block_size, lp.n_centroids,
                                 lp.n_centroids_requested, lp.objective, stage, position, name in input_ids or run is None))
    return Plan(tuple(entries), tuple(tuple(s) for s in stages))
