"""Pipelines as data: YAML -> frozen dataclasses, unknown keys rejected by name.

A value of ``???`` marks a required setting that the pipeline cannot know (a
dataset path); it must be given with ``--set key=value`` before a command that
needs it runs, and :func:`require` says so by name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .objectives import NAMES as OBJECTIVES
from .plan import Rule

MISSING = "???"
# YAML 1.1 (PyYAML) reads 1e-3 as a string (it wants 1.0e-3); a float setting accepts it.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A pipeline file or override is invalid; the message names the file and key."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}: {pattern!r} is not a valid regular expression: {e}") from None


def from_mapping(cls, data, where: str = ""):
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys are errors naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases = getattr(cls, "_aliases", {})
    kwargs = {}
    for key, value in data.items():
        attr = aliases.get(key, key)
        if attr not in fields or attr.startswith("_"):
            yaml_names = {v: k for k, v in aliases.items()}
            allowed = sorted(yaml_names.get(k, k) for k in fields)
            raise ConfigError(f"{where or 'top level'}: unknown key {key!r} (allowed: {', '.join(allowed)})")
        kwargs[attr] = _convert(hints[attr], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where or 'top level'}: missing required key {missing[0]!r}") from None
        raise ConfigError(f"{where or 'top level'}: {e}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or 'top level'}: {e}") from None


def to_mapping(obj) -> Any:
    """A dataclass config back to plain YAML-able data (inverse of :func:`from_mapping`)."""
    if dataclasses.is_dataclass(obj):
        aliases = {v: k for k, v in getattr(type(obj), "_aliases", {}).items()}
        return {aliases.get(f.name, f.name): to_mapping(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, tuple):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class ModelConfig:
    adapter: str
    arch: str
    weights: str | None = None        # a torchvision weights enum name, e.g. IMAGENET1K_V1
    checkpoint: str | None = None     # a local state-dict file; takes precedence over weights
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HessianConfig:
    """Settings of the ``hessian`` objective (bgd_dist/core/hessian.py)."""

    # λ = damp · mean(diag H) added before inverting H (GPTQ's percdamp); ``auto``: chosen per layer
    # from the effective rank r of its L x L H (bgd_dist.core.hessian.auto_damp): 0.01 · L / r, at most 1
    damp: float | str = 0.01
    rounds: int = 4                   # error-feedback assignment + exact codebook update, alternated
    cg_steps: int = 20                # conjugate-gradient steps per exact codebook update
    max_mb: float = 256.0             # a layer whose L x L float64 H is larger uses the pooled Gram (logged)
    # what the fit reproduces on the student's inputs x̃ (earlier stages quantized): the layer's own outputs
    # W x̃ (weights, GPTQ's and the paper's target) or the teacher's outputs W x on the teacher's inputs
    # (teacher: also collects Σ x̃ xᵀ, corrects what the earlier stages got wrong; TeacherTargetStats)
    target: str = "weights"
    # teacher target: only the layers whose qualified name fully matches this regular expression (the others
    # keep the weights target), e.g. to leave out heads whose input rows do not pair with the teacher's
    # (a detector's region heads see the student's own proposals)
    teacher_match: str = ".*"
    # teacher target: a layer whose relative input error Σ||x - x̃||² / Σ||x||² exceeds this keeps the
    # weights target (its rows are too far from the teacher's to be worth chasing; logged)
    max_input_error: float = 0.5
    # teacher target: W* is the ridge solution min ||Ŵx̃ - Wx||² + λ_t ||Ŵ - W||², λ_t = target_damp · mean(diag H):
    # larger keeps W* nearer W (a layer with fewer input rows than inputs otherwise fits the calibration images'
    # noise); None: the fit's own damp; auto: per layer, the damp (of 0.001 ... 10, or W itself) whose W* best
    # reproduces the teacher's outputs on the held-out images (needs quantize.holdout > 0)
    target_damp: float | str | None = None

    def __post_init__(self):
        if isinstance(self.damp, str):
            if self.damp != "auto":
                raise ValueError(f"damp: expected a number > 0 or auto, got {self.damp!r}")
        elif not self.damp > 0:
            raise ValueError(f"damp: must be > 0, got {self.damp}")
        for key in ("rounds", "cg_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.max_mb > 0:
            raise ValueError(f"max_mb: must be > 0, got {self.max_mb}")
        if self.target not in ("weights", "teacher"):
            raise ValueError(f"target: unknown value {self.target!r}; expected weights or teacher")
        _check_regex("teacher_match", self.teacher_match)
        if isinstance(self.target_damp, str):
            if self.target_damp != "auto":
                raise ValueError(f"target_damp: expected a number > 0, auto or null, got {self.target_damp!r}")
        elif self.target_damp is not None and not self.target_damp > 0:
            raise ValueError(f"target_damp: must be > 0, got {self.target_damp}")
        if not self.max_input_error >= 0:
            raise ValueError(f"max_input_error: must be >= 0, got {self.max_input_error}")


@dataclass(frozen=True)
class AllocationConfig:
    """Candidates for ``target_mb``: every layer the rules quantize picks (d, K) from these sets
    (block sizes that do not divide a layer's row length are dropped for it; K is clamped),
    plus its rule's own choice."""

    block_sizes: tuple[int, ...] = (4, 8, 9, 16, 18)
    n_centroids: tuple[int, ...] = (16, 32, 64, 128, 256)
    n_iter: int = 20                  # k-means iterations of each candidate fit (error prediction)
    n_calibration: int | None = None  # images for the allocation statistics; None = quantize.n_calibration
    method: str = "exact"             # exact (dynamic programming, optimal) | greedy (error decrease per byte)

    def __post_init__(self):
        if self.method not in ("greedy", "exact"):
            raise ValueError(f"method: unknown value {self.method!r}; expected greedy or exact")
        if not self.block_sizes or min(self.block_sizes) < 1:
            raise ValueError(f"block_sizes: need positive integers, got {list(self.block_sizes)}")
        if not self.n_centroids or min(self.n_centroids) < 1:
            raise ValueError(f"n_centroids: need positive integers, got {list(self.n_centroids)}")
        if self.n_iter < 0:
            raise ValueError(f"n_iter: must be >= 0, got {self.n_iter}")
        if self.n_calibration is not None and self.n_calibration < 1:
            raise ValueError(f"n_calibration: must be >= 1, got {self.n_calibration}")


@dataclass(frozen=True)
class QuantizeConfig:
    rules: tuple[Rule, ...]
    n_centroids: int = 256
    n_iter: int = 100
    init: str = "random"
    restarts: int = 1                 # k-means initialisations per layer; the lowest final objective is kept
    refine: str = "hartigan"          # k-means iterations: hartigan (Lloyd + exact Hartigan moves) | lloyd
    kmeans_backend: str = "torch"     # the E-step's nearest-centroid search: torch | faiss (needs faiss-cpu)
    objective: str = "paper"          # paper (pooled Gram) | weights (identity metric) | hessian (full H)
    hessian: HessianConfig = HessianConfig()
    target_mb: float | None = None    # size budget (paper accounting): choose d and K per layer to meet it
    allocation: AllocationConfig = AllocationConfig()
    clamp: bool = True
    keep_stats: str = "pooled"        # stages/<k>/stats.pt: pooled (Hessians reduced to the paper's d x d Gram) |
                                      # full (as collected, L x L float64) | none (resume never reads them)
    n_calibration: int = 1024         # calibration images per stage
    batch_size: int = 128
    seed: int = 0
    # after a stage is swapped, shift each layer's output back to the teacher's per-channel mean on
    # the calibration images (into the layer's bias, or the beta of the BatchNorm that reads it)
    bias_correction: bool = False
    holdout: float = 0.0              # share of the calibration images kept out of the fit (objective_holdout)
    permute: bool = False             # permute channels (function-preserving) before quantizing (PQF)
    # in the passes that run the teacher and the student on the same images (hessian.target: teacher,
    # bias_correction), the student's modules whose qualified name fully matches this regular expression
    # return the teacher's output of the same call: what follows them sees the teacher's, so their consumers'
    # rows pair with the teacher's (a detector's proposals and detections: 'rpn\.head|roi_heads\.box_predictor',
    # modules the adapter's forward actually calls);
    # empty: none. The fit of the matched modules' own layers is unchanged (their inputs are the student's)
    teacher_forcing: str = ""

    @property
    def n_holdout(self) -> int:
        """Calibration images held out of the fit: the last ``round(holdout · n_calibration)``
        positions of the calibration stream (:func:`bgd_dist.sharding.calibration_items`)."""
        return round(self.holdout * self.n_calibration) if self.holdout > 0 else 0

    @property
    def n_fit(self) -> int:
        """Calibration images the statistics of the fit are collected on (the first positions)."""
        return self.n_calibration - self.n_holdout

    def __post_init__(self):
        if not self.rules:
            raise ValueError("rules: at least one rule is required")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown value {self.objective!r}; expected one of {OBJECTIVES}")
        if self.refine not in ("hartigan", "lloyd"):
            raise ValueError(f"refine: unknown value {self.refine!r}; expected hartigan or lloyd")
        if self.kmeans_backend not in ("torch", "faiss"):
            raise ValueError(f"kmeans_backend: unknown value {self.kmeans_backend!r}; expected torch or faiss")
        if self.kmeans_backend == "faiss":
            from importlib.util import find_spec

            if find_spec("faiss") is None:
                raise ValueError("kmeans_backend: faiss needs the faiss-cpu package (pip install 'bgd-dist[faiss]')")
        if self.keep_stats not in ("pooled", "full", "none"):
            raise ValueError(f"keep_stats: unknown value {self.keep_stats!r}; expected pooled, full or none")
        if self.init not in ("random", "kmeans++"):
            raise ValueError(f"init: unknown value {self.init!r}; expected random or kmeans++")
        if self.target_mb is not None and not self.target_mb > 0:
            raise ValueError(f"target_mb: must be > 0, got {self.target_mb}")
        for key in ("n_centroids", "n_iter", "n_calibration", "batch_size", "restarts"):
            if getattr(self, key) < (0 if key == "n_iter" else 1):
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout: must be in [0, 1), got {self.holdout}")
        _check_regex("teacher_forcing", self.teacher_forcing)
        if self.hessian.target_damp == "auto" and not self.holdout > 0:
            raise ValueError("hessian.target_damp: auto chooses on held-out images; set quantize.holdout > 0")
        if self.holdout > 0 and not 1 <= self.n_holdout < self.n_calibration:
            raise ValueError(f"holdout: {self.holdout:g} of n_calibration = {self.n_calibration} leaves "
                             f"{self.n_holdout} held-out and {self.n_fit} fitted images; both need at least one")


LR_SCALINGS = ("linear", "sqrt", "none")


def scaled_lr(lr: float, batch_size: int, reference_batch: int | None, scaling: str) -> float:
    """The learning rate for ``batch_size`` when ``lr`` was set for ``reference_batch`` images per
    step: ``lr * batch / reference`` (linear, the default), ``lr * sqrt(batch / reference)``, or
    ``lr`` itself (``none``, or no reference batch)."""
    if reference_batch is None or scaling == "none":
        return lr
    ratio = batch_size / reference_batch
    return lr * (ratio if scaling == "linear" else ratio ** 0.5)


class _PhaseConfig:
    """What both distillation phases share: the learning-rate rule and its checks.

    ``lr`` is the learning rate at ``lr_reference_batch`` images per step (the paper's 0.05 and
    0.01 are for 128); another ``batch_size`` scales it by ``lr_scaling``. Without a reference
    batch ``lr`` is used as given."""

    def __post_init__(self):
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling: unknown rule {self.lr_scaling!r}; expected one of {LR_SCALINGS}")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch: must be >= 1, got {self.lr_reference_batch}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    @property
    def effective_lr(self) -> float:
        return scaled_lr(self.lr, self.batch_size, self.lr_reference_batch, self.lr_scaling)


@dataclass(frozen=True)
class LayerwiseConfig(_PhaseConfig):
    enabled: bool = True
    iterations: int = 2500
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    lr_reference_batch: int | None = None
    lr_scaling: str = "linear"
    train_bn: bool = False            # also train the affine parameters of the BN right after the stage's layers
    train_bias: bool = False          # also train the biases of the stage's quantized layers
    reuse_teacher: bool = False       # one batch stream for every stage; teacher outputs cached per step
    teacher_cache_mb: float = 1024.0  # per worker; steps beyond it run the teacher again (reuse_teacher)

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher_cache_mb >= 0:
            raise ValueError(f"teacher_cache_mb: must be >= 0 (0: no cache), got {self.teacher_cache_mb}")


@dataclass(frozen=True)
class GlobalConfig(_PhaseConfig):
    enabled: bool = True
    epochs: int = 9
    iterations_per_epoch: int = 10000
    lr: float = 0.01
    lr_step_epochs: int = 3
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    lr_reference_batch: int | None = None
    lr_scaling: str = "linear"
    folded_bn: str = "eval"           # BN layers found folded at plan time: eval | unfold | train
    train_bn: bool = False            # also train every BatchNorm's affine parameters
    train_bias: bool = False          # also train the biases of every conv / linear layer (quantized or dense)

    def __post_init__(self):
        super().__post_init__()
        from .batchnorm import FOLDED_BN_MODES

        if self.folded_bn not in FOLDED_BN_MODES:
            raise ValueError(f"folded_bn: unknown mode {self.folded_bn!r}; expected one of {FOLDED_BN_MODES}")


@dataclass(frozen=True)
class FinetuneConfig:
    _aliases = {"global": "global_"}
    layerwise: LayerwiseConfig = LayerwiseConfig()
    global_: GlobalConfig = GlobalConfig()
    checkpoint_every: int = 500       # distillation steps between phase checkpoints (resume, worker replacement)
    # divergence guard: a phase whose loss turns non-finite, or whose mean loss over a checkpoint
    # interval rises above divergence_factor x its starting loss (0: off), is stopped; its centroids
    # go back to where the phase started and it is retried at lr x lr_backoff (at most max_lr_retries
    # times), or the run fails with a one-line message (on_divergence: fail)
    divergence_factor: float = 10.0
    on_divergence: str = "retry_lower_lr"
    max_lr_retries: int = 2
    lr_backoff: float = 0.1

    def __post_init__(self):
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        if self.on_divergence not in ("retry_lower_lr", "fail"):
            raise ValueError(f"on_divergence: unknown action {self.on_divergence!r}; expected retry_lower_lr or fail")
        if self.divergence_factor < 0 or self.divergence_factor != self.divergence_factor:
            raise ValueError(f"divergence_factor: must be >= 0 (0: no check), got {self.divergence_factor}")
        if self.max_lr_retries < 0:
            raise ValueError(f"max_lr_retries: must be >= 0, got {self.max_lr_retries}")
        if not 0 < self.lr_backoff < 1:
            raise ValueError(f"lr_backoff: must be in (0, 1), got {self.lr_backoff}")


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "ray"                 # ray | serial
    num_workers: int = 2
    num_cpus: int | None = None       # for a local cluster; None = num_workers
    num_gpus_per_worker: float = 0.0
    address: str | None = None        # None: start a local cluster; "auto" or HOST:PORT: join one
    max_fit_tasks: int = 8            # codebook fitting tasks in flight (ray.wait back-pressure)
    actor_resources: dict = field(default_factory=dict)   # custom Ray resources each stats actor asks, {name: amount}
    schedule_timeout_s: float | None = None   # wait this long for actor resources the cluster lacks now (None:
    #                                           fail at once, or 600 s if the cluster autoscales)
    start_timeout_s: float = 600.0    # a stats actor's start-up (building its model replica)
    threads_per_worker: int | None = None   # torch intra-op threads per worker; None: 1 per Ray actor, the
                                            # process's own setting for the serial executor

    def __post_init__(self):
        for key, amount in self.actor_resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"actor_resources.{key}: expected a positive number, got {amount!r}")
        if self.schedule_timeout_s is not None and self.schedule_timeout_s < 0:
            raise ValueError(f"schedule_timeout_s: must be >= 0, got {self.schedule_timeout_s}")
        if not self.start_timeout_s > 0:
            raise ValueError(f"start_timeout_s: must be > 0, got {self.start_timeout_s}")
        if self.kind not in ("ray", "serial"):
            raise ValueError(f"kind: unknown executor {self.kind!r}; expected ray or serial")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker: must be >= 1, got {self.threads_per_worker}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class EvalConfig:
    max_images: int | None = None     # evaluate on a fixed subset (the adapter's data section sets batch sizes)


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    model: ModelConfig
    quantize: QuantizeConfig
    data: dict = field(default_factory=dict)
    finetune: FinetuneConfig = FinetuneConfig()
    executor: ExecutorConfig = ExecutorConfig()
    eval: EvalConfig = EvalConfig()
    source: str | None = field(default=None, compare=False)

    def to_yaml(self) -> str:
        d = to_mapping(self)
        d.pop("source", None)
        return yaml.safe_dump(d, sort_keys=False)


def _apply_override(raw: dict, override: str, where: str) -> None:
    """``a.b.c=value``; a number indexes a list (``quantize.rules.0.block_size=8``)."""
    if "=" not in override:
        raise ConfigError(f"{where}: override {override!r} must be KEY=VALUE")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: override {key!r}: {'.'.join(parts[:i])} is a list of {len(node)} "
                                  f"items; {part!r} is not an index of it")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: override {key!r}: {'.'.join(parts[:i])!r} is not a section")
        if last:
            node[part] = yaml.safe_load(value) if value != "" else None
        else:
            if isinstance(node, dict) and (part not in node or node[part] is None):
                node[part] = {}
            node = node[part]


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML file, apply ``--set`` overrides, validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline must be a mapping at the top level")
    for o in overrides:
        _apply_override(raw, o, str(path))
    raw.setdefault("name", path.stem)
    raw["source"] = str(path)
    try:
        cfg = from_mapping(PipelineConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    check_sections(cfg)
    return cfg


def check_sections(cfg: PipelineConfig) -> None:
    """The adapter's own sections (``data:``, ``model:``) are validated when the pipeline is read,
    by constructing the adapter and asking for its architecture (neither builds a model): errors
    name the file."""
    from .adapters import make_adapter

    try:
        make_adapter(cfg.model, cfg.data).arch()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def missing_keys(cfg: PipelineConfig) -> list[str]:
    """The dotted keys still set to ``???``, in file order."""
    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{prefix}.{i}")
        elif node == MISSING:
            yield prefix

    return list(walk(to_mapping(cfg), ""))


def require_all(cfg: PipelineConfig, ignore=lambda key: False) -> None:
    """Every required (``???``) key at once, before any model is built: one error naming them all
    (``ignore(key)``: keys the command does not need)."""
    missing = [k for k in missing_keys(cfg) if not ignore(k)]
    if missing:
        src = f"{cfg.source}: " if cfg.source else ""
        raise ConfigError(f"{src}required setting{'s' if len(missing) > 1 else ''} missing: {', '.join(missing)}; "
                          f"pass {' '.join(f'--set {k}=...' for k in missing)}")


def pipeline_from_dict(raw: dict) -> PipelineConfig:
    return from_mapping(PipelineConfig, raw)


def require(value, key: str, config: PipelineConfig | None = None):
    """Return ``value`` unless it is missing (None or ``???``), else a clear error naming ``key``."""
    if value is None or value == MISSING:
        src = f"{config.source}: " if config is not None and config.source else ""
        raise ConfigError(f"{src}{key} is required: pass --set {key}=...")
    return value
