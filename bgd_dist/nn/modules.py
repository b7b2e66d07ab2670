"""Quantized layers: centroids are parameters, assignments buffers (METHOD.md §4).

While gradients can flow (training, distillation, or any forward with grad
enabled on trainable centroids) the dense weight is decoded on every forward
by :class:`_DecodeMeanGrad`, an autograd function whose backward gives each
centroid the MEAN of the gradients of its assigned subvectors. Because the
averaging lives in the function (not in a tensor hook), it survives
``pickle`` / ``deepcopy`` and crossing Ray process boundaries.

Inference runs at dense speed: in eval mode, when no gradient can reach the
centroids, a layer decodes its weight once and reuses it until the centroids
or the assignments change. The cached weight is keyed on both tensors'
identity, version counters (every in-place change bumps them: optimizer steps,
``copy_``, ``load_state_dict``), device and dtype, and is dropped on
``train()``, ``.to()`` / ``.cuda()`` / ``.half()`` and pickling, so it is never
stale (the one exception is writing through ``.data``, which bypasses version
counters: call :meth:`PQLayer.clear_cache` after that). The memory-lean mode,
decoding per call as in training, is ``set_weight_cache(model, False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.kmeans import Codebook
from ..core.layouts import LayerGeometry, from_subvectors, geometry_of


class _DecodeMeanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centroids: Tensor, assignments: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(assignments, counts)
        ctx.n_centroids = centroids.shape[0]
        return centroids[assignments]

    @staticmethod
    def backward(ctx, grad_subvectors: Tensor):
        assignments, counts = ctx.saved_tensors
        grad = torch.zeros(ctx.n_centroids, grad_subvectors.shape[1], dtype=grad_subvectors.dtype,
                           device=grad_subvectors.device)
        grad.index_add_(0, assignments, grad_subvectors)
        grad = grad / counts.clamp_min(1).to(grad.dtype).unsqueeze(1)
        return grad, None, None


class PQLayer(nn.Module):
    """Base of the quantized layers. ``weight`` is derived: ``decode(centroids, assignments)``."""

    def __init__(self, geometry: LayerGeometry, centroids: Tensor, assignments: Tensor,
                 bias: Tensor | None, name: str = "<layer>"):
        super().__init__()
        self.geometry = geometry
        self.block_size = int(centroids.shape[1])
        self.layer_name = name
        n_sub = geometry.n_subvectors(self.block_size, name)
        if assignments.shape != (n_sub,):
            raise ValueError(f"layer {name!r}: expected {n_sub} assignments, got {tuple(assignments.shape)}")
        if assignments.numel() and (int(assignments.min()) < 0 or int(assignments.max()) >= centroids.shape[0]):
            raise ValueError(f"layer {name!r}: assignment out of range [0, {centroids.shape[0]})")
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("assignments", assignments.detach().clone().long())
        self.register_buffer("counts", torch.bincount(self.assignments, minlength=centroids.shape[0]),
                             persistent=False)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.cache_weight = True      # eval-mode inference reuses the decoded weight (see the module doc)
        self._cache: tuple[tuple, Tensor] | None = None

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    def decode(self) -> Tensor:
        """The dense weight, decoded now (differentiable w.r.t. the centroids, mean gradients)."""
        counts = self.counts
        if counts.device != self.assignments.device:  # pragma: no cover - moved by hand
            counts = counts.to(self.assignments.device)
        sub = _DecodeMeanGrad.apply(self.centroids, self.assignments, counts)
        return from_subvectors(sub, self.geometry, self.block_size, self.layer_name)

    def _cache_key(self) -> tuple:
        c, a = self.centroids, self.assignments
        return (c.data_ptr(), c._version, c.device, c.dtype, tuple(c.shape),
                a.data_ptr(), a._version, a.device, tuple(a.shape))

    def _use_cache(self) -> bool:
        if not self.cache_weight or self.training:
            return False
        # a gradient could reach the centroids: decode through the autograd function
        return not (torch.is_grad_enabled() and self.centroids.requires_grad)

    @property
    def weight(self) -> Tensor:
        """The dense weight: decoded per call while gradients may flow, else the cached decoding."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or not self._use_cache():
            return self.decode()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            # outside inference mode, so the cached tensor may later meet autograd (e.g. an input
            # that requires grad while the centroids are frozen)
            with torch.inference_mode(False), torch.no_grad():
                w = self.decode().contiguous()
            self._cache = (key, w)
        return self._cache[1]

    def clear_cache(self) -> None:
        """Drop the cached dense weight (needed only after writing through ``.data``)."""
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_cache": None}

    def __setstate__(self, state):
        state.setdefault("cache_weight", True)
        state.setdefault("_cache", None)
        super().__setstate__(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "assignments")
        centroids = state_dict.get(prefix + "centroids", self.centroids)
        if incoming is not None and incoming.numel() and \
                (int(incoming.min()) < 0 or int(incoming.max()) >= centroids.shape[0]):
            raise ValueError(f"layer {self.layer_name!r}: assignment out of range [0, {centroids.shape[0]}) "
                             f"in the state dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.counts = torch.bincount(self.assignments, minlength=self.centroids.shape[0])
        self._cache = None

    def codebook(self) -> Codebook:
        return Codebook(self.centroids.detach().clone(), self.assignments.clone(), ())

    def extra_repr(self) -> str:
        return (f"{self.geometry.kind}, weight_shape={tuple(self.geometry.weight_shape)}, "
                f"block_size={self.block_size}, n_centroids={self.n_centroids}")

    @classmethod
    def from_dense(cls, module: nn.Module, codebook: Codebook, name: str = "<layer>") -> "PQLayer":
        raise NotImplementedError


class PQConv2d(PQLayer):
    def __init__(self, geometry: LayerGeometry, centroids: Tensor, assignments: Tensor, bias: Tensor | None,
                 padding_mode: str = "zeros", name: str = "<layer>"):
        super().__init__(geometry, centroids, assignments, bias, name)
        self.stride, self.padding, self.dilation = geometry.stride, geometry.padding, geometry.dilation
        self.groups = geometry.groups
        self.padding_mode = padding_mode

    @classmethod
    def from_dense(cls, module: nn.Conv2d, codebook: Codebook, name: str = "<layer>") -> "PQConv2d":
        return cls(geometry_of(module), codebook.centroids, codebook.assignments, module.bias,
                   module.padding_mode, name)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PQConvTranspose2d(PQLayer):
    def __init__(self, geometry: LayerGeometry, centroids: Tensor, assignments: Tensor, bias: Tensor | None,
                 output_padding: tuple[int, int] = (0, 0), name: str = "<layer>"):
        super().__init__(geometry, centroids, assignments, bias, name)
        self.stride, self.padding, self.dilation = geometry.stride, geometry.padding, geometry.dilation
        self.groups = geometry.groups
        self.output_padding = tuple(output_padding)

    @classmethod
    def from_dense(cls, module: nn.ConvTranspose2d, codebook: Codebook, name: str = "<layer>"):
        return cls(geometry_of(module), codebook.centroids, codebook.assignments, module.bias,
                   module.output_padding, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)


class PQLinear(PQLayer):
    @classmethod
    def from_dense(cls, module: nn.Linear, codebook: Codebook, name: str = "<layer>") -> "PQLinear":
        return cls(geometry_of(module), codebook.centroids, codebook.assignments, module.bias, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


PQ_TYPES = {"conv2d": PQConv2d, "conv_transpose2d": PQConvTranspose2d, "linear": PQLinear}


def quantized_from_dense(module: nn.Module, codebook: Codebook, name: str = "<layer>") -> PQLayer:
    """The quantized replacement of a dense Conv2d / ConvTranspose2d / Linear."""
    cls = PQ_TYPES[geometry_of(module).kind]
    q = cls.from_dense(module, codebook, name)
    return q.to(device=module.weight.device, dtype=module.weight.dtype)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"model has no layer {name!r}") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_(model: nn.Module, plan, codebooks: dict[str, Codebook]) -> nn.Module:
    """Swap the layers named in ``codebooks`` for quantized modules, in place.

    ``plan`` is a :class:`bgd_dist.plan.Plan`; each layer's geometry and block
    size are checked against it before anything is swapped.
    """
    swaps = []
    for name, codebook in codebooks.items():
        entry = plan.layer(name)
        if entry.skip:
            raise ValueError(f"layer {name!r} is marked skip (left uncompressed) in the plan")
        module = get_submodule(model, name)
        if isinstance(module, PQLayer):
            raise ValueError(f"layer {name!r} is already quantized")
        geometry = geometry_of(module)
        if geometry != entry.geometry:
            raise ValueError(f"layer {name!r}: model geometry {geometry} differs from the plan's {entry.geometry}")
        if codebook.block_size != entry.block_size:
            raise ValueError(f"layer {name!r}: codebook block size {codebook.block_size} != plan's {entry.block_size}")
        swaps.append((name, quantized_from_dense(module, codebook, name)))
    for name, q in swaps:
        set_submodule(model, name, q)
    return model


def pq_layers(model: nn.Module) -> dict[str, PQLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PQLayer)}


def set_weight_cache(model: nn.Module, enabled: bool) -> nn.Module:
    """Eval-mode inference reuses each layer's decoded weight (``True``, the default: dense speed,
    one dense weight per layer in memory) or decodes it on every call (``False``: memory-lean)."""
    for layer in pq_layers(model).values():
        layer.cache_weight = bool(enabled)
        layer.clear_cache()
    return model


def dense_layer(layer: PQLayer) -> nn.Module:
    """The plain ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` computing what ``layer`` computes,
    its weight the decoded one (same device and dtype)."""
    g = layer.geometry
    s = g.weight_shape
    bias = layer.bias is not None
    factory = {"device": "meta"}
    if isinstance(layer, PQConv2d):
        dense = nn.Conv2d(s[1] * g.groups, s[0], g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                          bias, layer.padding_mode, **factory)
    elif isinstance(layer, PQConvTranspose2d):
        dense = nn.ConvTranspose2d(s[0], s[1] * g.groups, g.kernel_size, g.stride, g.padding,
                                   layer.output_padding, g.groups, bias, g.dilation, **factory)
    elif isinstance(layer, PQLinear):
        dense = nn.Linear(s[1], s[0], bias, **factory)
    else:  # pragma: no cover - every PQ type is listed above
        raise TypeError(f"layer {layer.layer_name!r}: no dense counterpart for {type(layer).__name__}")
    with torch.no_grad():
        dense.weight = nn.Parameter(layer.decode().detach().contiguous().clone())
        if bias:
            dense.bias = nn.Parameter(layer.bias.detach().clone())
    return dense.train(layer.training)


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` by its plain dense counterpart, in place: the result
    is the original architecture (its state dict loads into it with ``strict=True``)."""
    for name, layer in pq_layers(model).items():
        set_submodule(model, name, dense_layer(layer))
    return model
