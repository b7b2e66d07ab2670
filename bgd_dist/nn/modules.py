"""Quantized layers: centroids are parameters, assignments buffers (METHOD.md §4).

The dense weight is decoded on every forward by :class:`_DecodeMeanGrad`, an
autograd function whose backward gives each centroid the MEAN of the
gradients of its assigned subvectors. Because the averaging lives in the
function (not in a tensor hook), it survives ``pickle`` / ``deepcopy`` and
crossing Ray process boundaries.
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

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def weight(self) -> Tensor:
        counts = self.counts
        if counts.device != self.assignments.device:  # pragma: no cover - moved by hand
            counts = counts.to(self.assignments.device)
        sub = _DecodeMeanGrad.apply(self.centroids, self.assignments, counts)
        return from_subvectors(sub, self.geometry, self.block_size, self.layer_name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "assignments")
        centroids = state_dict.get(prefix + "centroids", self.centroids)
        if incoming is not None and incoming.numel() and \
                (int(incoming.min()) < 0 or int(incoming.max()) >= centroids.shape[0]):
            raise ValueError(f"layer {self.layer_name!r}: assignment out of range [0, {centroids.shape[0]}) "
                             f"in the state dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.counts = torch.bincount(self.assignments, minlength=self.centroids.shape[0])

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
