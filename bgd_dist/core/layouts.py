"""Weight <-> subvector layouts and the matching input rows (METHOD.md §1).

A quantizable layer is described by a :class:`LayerGeometry` (plain data, so it
crosses process boundaries and goes into ``plan.json``). Every layer kind is
reduced to one *weight matrix* of shape ``(n_rows, row_length)`` where one row
is the weight vector of one output (a conv filter, a linear output, a
transposed-conv output column) over the inputs it reads, and one *input row*
has ``row_length`` values: the inputs that such a row multiplies.

Subvectors are contiguous runs of ``block_size`` values of a row, listed in the
reference's block-major "unrolled" order: subvector ``i = j * n_rows + p`` is
block ``j`` of row ``p``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("conv2d", "conv_transpose2d", "linear")


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts of one quantizable layer.

    ``weight_shape`` is the shape of the module's ``weight`` as torch stores it:
    conv2d ``(C_out, C_in/groups, kh, kw)``, conv_transpose2d
    ``(C_in, C_out/groups, kh, kw)``, linear ``(C_out, C_in)``.
    """

    kind: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "weight_shape", tuple(int(s) for s in self.weight_shape))
        for field in ("stride", "padding", "dilation"):
            object.__setattr__(self, field, tuple(int(s) for s in getattr(self, field)))
        expected = 2 if self.kind == "linear" else 4
        if len(self.weight_shape) != expected:
            raise ValueError(f"{self.kind} weight must have {expected} dims, got {self.weight_shape}")

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (1, 1) if self.kind == "linear" else tuple(self.weight_shape[2:])  # type: ignore[return-value]

    @property
    def n_rows(self) -> int:
        """Number of weight rows (outputs) sharing the input row layout."""
        s = self.weight_shape
        if self.kind == "conv_transpose2d":
            return s[1] * self.groups * s[2] * s[3]
        return s[0]

    @property
    def row_length(self) -> int:
        s = self.weight_shape
        if self.kind == "conv2d":
            return s[1] * s[2] * s[3]
        if self.kind == "conv_transpose2d":
            return s[0] // self.groups
        return s[1]

    @property
    def n_weights(self) -> int:
        return math.prod(self.weight_shape)

    def n_blocks(self, block_size: int, name: str = "<layer>") -> int:
        check_block_size(self, block_size, name)
        return self.row_length // block_size

    def n_subvectors(self, block_size: int, name: str = "<layer>") -> int:
        return self.n_blocks(block_size, name) * self.n_rows

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("weight_shape", "stride", "padding", "dilation"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerGeometry":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def geometry_of(module: torch.nn.Module) -> LayerGeometry:
    """The geometry of a Conv2d, ConvTranspose2d or Linear module (or a quantized one)."""
    if hasattr(module, "geometry") and isinstance(module.geometry, LayerGeometry):
        return module.geometry
    if isinstance(module, torch.nn.ConvTranspose2d):
        return LayerGeometry("conv_transpose2d", tuple(module.weight.shape), module.groups,
                             module.stride, _pair_padding(module), module.dilation)
    if isinstance(module, torch.nn.Conv2d):
        return LayerGeometry("conv2d", tuple(module.weight.shape), module.groups,
                             module.stride, _pair_padding(module), module.dilation)
    if isinstance(module, torch.nn.Linear):
        return LayerGeometry("linear", tuple(module.weight.shape))
    raise TypeError(f"not a quantizable layer: {type(module).__name__}")


def _pair_padding(module) -> tuple[int, int]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        raise ValueError(f"padding={module.padding!r} is not supported for statistics; use explicit padding")
    return tuple(module.padding)


def check_block_size(geometry: LayerGeometry, block_size: int, name: str = "<layer>") -> None:
    if not isinstance(block_size, int) or block_size < 1 or geometry.row_length % block_size:
        raise ValueError(
            f"layer {name!r}: block size d={block_size} does not divide the row length "
            f"{geometry.row_length} of {geometry.kind} weight of shape {tuple(geometry.weight_shape)}"
        )


def weight_matrix(weight: Tensor, geometry: LayerGeometry) -> Tensor:
    """Weight tensor -> ``(n_rows, row_length)``."""
    if geometry.kind == "conv_transpose2d":
        c_in, c_out_g, kh, kw = weight.shape
        g = geometry.groups
        w = weight.reshape(g, c_in // g, c_out_g, kh, kw).permute(0, 2, 3, 4, 1)
        return w.reshape(g * c_out_g * kh * kw, c_in // g)
    return weight.reshape(weight.shape[0], -1)


def weight_from_matrix(matrix: Tensor, geometry: LayerGeometry) -> Tensor:
    """Inverse of :func:`weight_matrix`."""
    if geometry.kind == "conv_transpose2d":
        c_in, c_out_g, kh, kw = geometry.weight_shape
        g = geometry.groups
        w = matrix.reshape(g, c_out_g, kh, kw, c_in // g).permute(0, 4, 1, 2, 3)
        return w.reshape(c_in, c_out_g, kh, kw)
    return matrix.reshape(geometry.weight_shape)


def to_subvectors(weight: Tensor, geometry: LayerGeometry, block_size: int, name: str = "<layer>") -> Tensor:
    """Weight -> ``(n_blocks * n_rows, block_size)`` in block-major order (METHOD §1)."""
    n_blocks = geometry.n_blocks(block_size, name)
    m = weight_matrix(weight, geometry)
    return m.reshape(geometry.n_rows, n_blocks, block_size).transpose(0, 1).reshape(-1, block_size)


def from_subvectors(subvectors: Tensor, geometry: LayerGeometry, block_size: int, name: str = "<layer>") -> Tensor:
    """``(n_blocks * n_rows, block_size)`` -> weight of ``geometry.weight_shape``."""
    n_blocks = geometry.n_blocks(block_size, name)
    if subvectors.shape != (n_blocks * geometry.n_rows, block_size):
        raise ValueError(
            f"layer {name!r}: expected subvectors of shape {(n_blocks * geometry.n_rows, block_size)}, "
            f"got {tuple(subvectors.shape)}"
        )
    m = subvectors.reshape(n_blocks, geometry.n_rows, block_size).transpose(0, 1).reshape(geometry.n_rows, -1)
    return weight_from_matrix(m, geometry)


def input_rows(x: Tensor, geometry: LayerGeometry, max_rows: int = 65536,
               name: str = "<layer>") -> Iterator[Tensor]:
    """Yield the layer's input rows, ``(m, row_length)`` chunks of at most ``max_rows`` rows.

    Row ``r`` is what one weight row multiplies: an im2col column for conv2d
    (one per output pixel and group), one input pixel's channel vector for
    conv_transpose2d (one per input pixel and group), one input vector for
    linear. Rows come image by image, output pixels in row-major order, groups
    innermost. Chunks never exceed ``max_rows`` rows: several images are
    batched when they fit, and an image with more rows than that is cut into
    bands of output rows, so memory does not grow with the batch or the image.
    """
    if max_rows < 1:
        raise ValueError(f"layer {name!r}: max_rows must be >= 1, got {max_rows}")
    g = geometry.groups
    s = geometry.weight_shape
    if geometry.kind == "linear":
        if x.dim() < 1 or x.shape[-1] != s[1]:
            raise ValueError(f"layer {name!r}: linear input must end with {s[1]} features, got {tuple(x.shape)}")
        flat = x.reshape(-1, x.shape[-1])
        yield from flat.split(max_rows)
        return
    c_in = s[0] if geometry.kind == "conv_transpose2d" else s[1] * g
    if x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(f"layer {name!r}: {geometry.kind} input must be (N, {c_in}, H, W), got {tuple(x.shape)}")
    if geometry.kind == "conv_transpose2d":
        n, c, h, w = x.shape
        per_image = max(h * w * g, 1)
        for xb in x.split(max(1, max_rows // per_image)):
            rows = xb.reshape(xb.shape[0], g, c // g, h * w).permute(0, 3, 1, 2).reshape(-1, c // g)
            yield from rows.split(max_rows)
        return
    kh, kw = geometry.kernel_size
    h, w = x.shape[-2:]
    ph, pw = geometry.padding
    sh, sw = geometry.stride
    dh, dw = geometry.dilation
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"layer {name!r}: input {tuple(x.shape)} is smaller than the kernel of {geometry}")
    per_image = out_h * out_w * g

    def unfolded(xb: Tensor, padding: tuple[int, int]) -> Tensor:
        cols = F.unfold(xb, (kh, kw), dilation=(dh, dw), padding=padding, stride=(sh, sw))
        # cols: (n, C_in*kh*kw, L); group gi owns rows [gi*row_length, (gi+1)*row_length)
        n, _, length = cols.shape
        cols = cols.reshape(n, g, geometry.row_length, length).permute(0, 3, 1, 2)
        return cols.reshape(-1, geometry.row_length)

    if per_image <= max_rows:
        for xb in x.split(max_rows // per_image):
            yield unfolded(xb, (ph, pw))
        return
    # one image is too large: cut it into bands of output rows (padding applied once per image)
    band = max(1, max_rows // (out_w * g))
    span = dh * (kh - 1) + 1
    for xi in x.split(1):
        xp = F.pad(xi, (pw, pw, ph, ph)) if ph or pw else xi
        for r0 in range(0, out_h, band):
            r1 = min(out_h, r0 + band)
            rows = unfolded(xp[:, :, r0 * sh:(r1 - 1) * sh + span], (0, 0))
            yield from rows.split(max_rows)
