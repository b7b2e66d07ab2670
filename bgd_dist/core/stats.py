"""Additive input statistics of one layer (METHOD.md §2).

The paper's metric between a subvector ``w`` and a centroid ``c`` is
``||X̃ (w - c)||²`` where ``X̃`` stacks, for every input row and every block
position ``j``, the ``d`` inputs that block ``j`` multiplies. That equals
``(w - c)ᵀ G (w - c)`` with ``G = X̃ᵀ X̃``: a ``d x d`` matrix that is a plain
sum over images, so it streams and merges across workers.

Every statistics type implements the same small protocol, so callers (hooks,
workers, the driver) never depend on which one a layer uses:

- ``update(x)``: accumulate a batch of layer *inputs* (the tensor the module
  receives), in bounded chunks;
- ``merge(other)``: a new object holding the sum of both;
- ``state()`` / ``from_state(state)``: plain data for crossing processes;
- ``metric()``: the matrix the k-means uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import ClassVar

import torch
from torch import Tensor

from .layouts import LayerGeometry, check_block_size, input_rows

STATS_TYPES: dict[str, type] = {}


def register_stats(cls):
    STATS_TYPES[cls.name] = cls
    return cls


def diagonal_blocks(matrix: Tensor, block_size: int) -> Tensor:
    """The ``d x d`` diagonal blocks of an ``L x L`` matrix, ``(L/d, d, d)`` (a view)."""
    n_blocks = matrix.shape[0] // block_size
    return matrix.reshape(n_blocks, block_size, n_blocks, block_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def memory_groups(items: list, nbytes, max_bytes: float) -> list[list]:
    """Consecutive groups of ``items`` whose summed ``nbytes(item)`` stays within ``max_bytes``.

    A new group starts when an item of non-zero size would overflow a non-empty
    group, so an item larger than ``max_bytes`` gets a group of its own and
    zero-size items stay with the group they come in.
    """
    groups: list[list] = []
    size = 0.0
    for item in items:
        b = nbytes(item)
        if not groups or (b and groups[-1] and size + b > max_bytes):
            groups.append([])
            size = 0.0
        groups[-1].append(item)
        size += b
    return groups


class _SummedMatrix:
    """What :class:`GramStats` and :class:`HessianStats` share: a float64 matrix summed over
    input rows (the dataclass field named by ``matrix_field``), ``n_rows`` and ``n_inputs`` counts,
    merged by addition."""

    matrix_field: ClassVar[str]

    @property
    def matrix(self) -> Tensor:
        return getattr(self, self.matrix_field)

    def merge(self, other):
        if not isinstance(other, type(self)) or other.block_size != self.block_size \
                or other.geometry != self.geometry:
            raise ValueError(f"layer {self.layer!r}: cannot merge statistics of a different layer or block size")
        return type(self)(self.geometry, self.block_size, self.matrix + other.matrix.to(self.matrix.device),
                          self.n_rows + other.n_rows, self.n_inputs + other.n_inputs, self.layer, self.max_rows)

    def check(self) -> None:
        if self.n_rows == 0:
            raise ValueError(f"layer {self.layer!r}: empty statistics (no calibration input reached this layer)")
        if not torch.isfinite(self.matrix).all():
            raise ValueError(f"layer {self.layer!r}: non-finite values in the statistics")

    def state(self) -> dict:
        return {"type": self.name, "geometry": self.geometry.to_dict(), "block_size": self.block_size,
                self.matrix_field: self.matrix.cpu(), "n_rows": self.n_rows, "n_inputs": self.n_inputs,
                "layer": self.layer}

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()


@register_stats
@dataclass
class GramStats(_SummedMatrix):
    """Pooled ``d x d`` Gram matrix of one layer's input, float64.

    ``gram`` is the sum over all input rows and block positions; ``n_rows`` the
    number of ``d``-dimensional rows summed (input rows x blocks) and
    ``n_inputs`` the number of input rows seen (pixels x groups, or vectors).
    """

    name: ClassVar[str] = "gram"
    matrix_field: ClassVar[str] = "gram"
    geometry: LayerGeometry
    block_size: int
    gram: Tensor
    n_rows: int = 0
    n_inputs: int = 0
    layer: str = "<layer>"
    max_rows: int = 65536

    @classmethod
    def empty(cls, geometry: LayerGeometry, block_size: int, layer: str = "<layer>",
              device: torch.device | str | None = None, max_rows: int = 65536) -> "GramStats":
        check_block_size(geometry, block_size, layer)
        gram = torch.zeros(block_size, block_size, dtype=torch.float64, device=device)
        return cls(geometry, block_size, gram, 0, 0, layer, max_rows)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Accumulate the inputs ``x`` of one forward call of the layer."""
        if not torch.isfinite(x).all():
            raise ValueError(f"layer {self.layer!r}: non-finite values in the layer input")
        d = self.block_size
        gram = self.gram.to(x.device)
        for rows in input_rows(x, self.geometry, self.max_rows, self.layer):
            blocks = rows.to(torch.float64).reshape(-1, d)
            gram += blocks.T @ blocks
            self.n_inputs += rows.shape[0]
            self.n_rows += blocks.shape[0]
        self.gram = gram

    def metric(self) -> Tensor:
        """The d x d metric: the Gram matrix normalised by the number of rows."""
        self.check()
        return self.gram / self.n_rows


@register_stats
@dataclass
class HessianStats(_SummedMatrix):
    """Full ``L x L`` second moment of one layer's input rows (``L`` = row length), float64.

    ``hessian`` is ``Σ x xᵀ`` over every input row ``x`` (an im2col column of
    ``C_in/groups · kh · kw`` values, one input vector for linear), so
    ``tr((W - Ŵ) H (W - Ŵ)ᵀ) / n_inputs`` is the mean squared layer-output
    error of the weight matrix ``Ŵ`` exactly, cross-terms between blocks
    included, for conv2d and linear layers (transposed convs with
    overlapping windows: per input pixel, as the paper's metric). Grouped
    convolutions are refused (each group sees its own inputs). The paper's pooled metric is the sum of its ``d x d``
    diagonal blocks (:meth:`pooled`), so one pass serves both objectives.
    Additive over images like :class:`GramStats`. ``n_rows`` counts
    ``d``-dimensional rows as in :class:`GramStats` (inputs x blocks).
    """

    name: ClassVar[str] = "hessian"
    matrix_field: ClassVar[str] = "hessian"
    geometry: LayerGeometry
    block_size: int
    hessian: Tensor
    n_rows: int = 0
    n_inputs: int = 0
    layer: str = "<layer>"
    max_rows: int = 65536

    @classmethod
    def empty(cls, geometry: LayerGeometry, block_size: int, layer: str = "<layer>",
              device: torch.device | str | None = None, max_rows: int = 65536) -> "HessianStats":
        check_block_size(geometry, block_size, layer)
        if geometry.groups != 1:
            # every group's rows multiply only that group's inputs: one pooled H would be wrong
            raise ValueError(f"layer {layer!r}: full input statistics need groups = 1 (got {geometry.groups}); "
                             f"use the paper objective (pooled Gram) for grouped convolutions")
        length = geometry.row_length
        hessian = torch.zeros(length, length, dtype=torch.float64, device=device)
        return cls(geometry, block_size, hessian, 0, 0, layer, max_rows)

    @staticmethod
    def bytes_for(geometry: LayerGeometry) -> int:
        """Bytes of the float64 ``L x L`` matrix of a layer (one copy)."""
        return geometry.row_length ** 2 * 8

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        self._accumulate(x)

    def _accumulate(self, x: Tensor, x_teacher: Tensor | None = None) -> None:
        """Add the input rows of ``x`` to ``H``; with ``x_teacher`` (same shape), also hand every chunk of
        rows and the teacher's rows at the same positions to :meth:`_add_pair`."""
        if not torch.isfinite(x).all() or (x_teacher is not None and not torch.isfinite(x_teacher).all()):
            raise ValueError(f"layer {self.layer!r}: non-finite values in the layer input")
        length = self.geometry.row_length
        # bounded chunks: at most ~32 MB of float64 rows at a time
        max_rows = max(1, min(self.max_rows, (1 << 22) // length))
        hessian = self.hessian.to(x.device)
        n_blocks = length // self.block_size
        chunks = input_rows(x, self.geometry, max_rows, self.layer)
        teacher = (repeat(None) if x_teacher is None
                   else input_rows(x_teacher.to(x.device), self.geometry, max_rows, self.layer))
        for rows, rows_t in zip(chunks, teacher):
            r64 = rows.to(torch.float64)
            hessian.addmm_(r64.T, r64)
            if rows_t is not None:
                self._add_pair(r64, rows_t.to(torch.float64))
            self.n_inputs += rows.shape[0]
            self.n_rows += rows.shape[0] * n_blocks
        self.hessian = hessian

    def _add_pair(self, rows: Tensor, rows_teacher: Tensor) -> None:
        raise TypeError(f"layer {self.layer!r}: {type(self).__name__} does not pair inputs with the teacher's")

    def metric(self) -> Tensor:
        """``E[x xᵀ]``: the ``L x L`` Hessian normalised by the number of input rows."""
        self.check()
        return self.hessian / self.n_inputs

    def pooled(self) -> GramStats:
        """The paper's statistics (:class:`GramStats`) of the same inputs: the sum of the
        ``d x d`` diagonal blocks of ``H`` (exactly what ``GramStats.update`` accumulates)."""
        gram = diagonal_blocks(self.hessian, self.block_size).sum(0)
        return GramStats(self.geometry, self.block_size, gram, self.n_rows, self.n_inputs, self.layer, self.max_rows)


@register_stats
@dataclass
class TeacherTargetStats(HessianStats):
    """:class:`HessianStats` of the student's input rows ``x̃``, plus what it takes to fit the
    layer to the *teacher's* outputs (``quantize.hessian.target: teacher``).

    The student's earlier layers are already quantized, so its input ``x̃`` differs from the
    teacher's ``x`` at the same position. Fitting ``Ŵ`` to ``W`` under ``H = Σ x̃ x̃ᵀ`` (the
    default) reproduces ``W x̃``; fitting it to reproduce the teacher's ``W x`` minimises
    ``Σ ||Ŵ x̃ - W x||² = tr((Ŵ - W*) H (Ŵ - W*)ᵀ) + const`` with the target weight
    ``W* = W Cᵀ H⁻¹ = W + W Dᵀ H⁻¹``, ``C = Σ x̃ xᵀ`` and ``D = C - H = Σ x̃ (x - x̃)ᵀ``
    (:meth:`target_weight`; ``H`` damped as in the fit, so ``W* = W`` exactly where the
    inputs agree). All sums are additive over images like ``H``.

    The rows of ``x`` and ``x̃`` must correspond (same image, same position): the teacher and
    the student see the same batch, and the module's calls are paired in order. Where they
    cannot be (a different number of rows, e.g. region features of different proposals)
    ``aligned`` becomes False and the layer keeps the default target. ``input_sq`` =
    ``Σ ||x||²`` and ``diff_sq`` = ``Σ ||x - x̃||²`` give the relative input error
    (:attr:`input_error`) the earlier stages left at this layer.
    """

    name: ClassVar[str] = "hessian_teacher"
    cross: Tensor | None = None
    input_sq: float = 0.0
    diff_sq: float = 0.0
    aligned: bool = True

    needs_teacher: ClassVar[bool] = True

    @classmethod
    def empty(cls, geometry: LayerGeometry, block_size: int, layer: str = "<layer>",
              device: torch.device | str | None = None, max_rows: int = 65536) -> "TeacherTargetStats":
        base = HessianStats.empty(geometry, block_size, layer, device, max_rows)
        return cls(geometry, block_size, base.hessian, 0, 0, layer, max_rows, torch.zeros_like(base.hessian))

    @staticmethod
    def bytes_for(geometry: LayerGeometry) -> int:
        """Bytes of the two float64 ``L x L`` matrices (``H`` and ``C``)."""
        return 2 * HessianStats.bytes_for(geometry)

    def update(self, x: Tensor) -> None:
        raise TypeError(f"layer {self.layer!r}: teacher-target statistics need the teacher's input too "
                        f"(update_pair)")

    @torch.no_grad()
    def update_pair(self, x: Tensor, x_teacher: Tensor | None) -> None:
        """Accumulate one forward call's student input ``x`` and the teacher's input at the same call
        (None: the teacher made no such call)."""
        if x_teacher is None or tuple(x.shape) != tuple(x_teacher.shape):
            self.aligned = False
        # once not aligned: H alone (the default target's statistics)
        self._accumulate(x, x_teacher if self.aligned else None)

    def _add_pair(self, rows: Tensor, rows_teacher: Tensor) -> None:
        self.cross = self.cross.to(rows.device).addmm_(rows.T, rows_teacher)
        self.input_sq += float(rows_teacher.pow(2).sum())
        self.diff_sq += float((rows_teacher - rows).pow(2).sum())

    def merge(self, other):
        out = super().merge(other)   # checks the layer and type, sums H and the counts
        out.cross = self.cross + other.cross.to(self.cross.device)
        out.input_sq, out.diff_sq = self.input_sq + other.input_sq, self.diff_sq + other.diff_sq
        out.aligned = self.aligned and other.aligned
        return out

    def state(self) -> dict:
        return {**super().state(), "cross": self.cross.cpu(), "input_sq": self.input_sq, "diff_sq": self.diff_sq,
                "aligned": self.aligned}

    @property
    def nbytes(self) -> int:
        return 2 * super().nbytes

    @property
    def input_error(self) -> float | None:
        """``Σ ||x - x̃||² / Σ ||x||²`` over the paired rows (None when not aligned or empty)."""
        if not self.aligned or self.input_sq <= 0:
            return None
        return self.diff_sq / self.input_sq

    def target_weight(self, weight_matrix: Tensor, damp: float) -> Tensor:
        """``W* = W + W Dᵀ (H + λI)⁻¹`` for the ``(n_rows, L)`` weight matrix ``W`` (float64),
        ``λ = damp · mean(diag H)`` as in the fit (:func:`~bgd_dist.core.hessian.teacher_target_weight`);
        ``W`` itself when the rows were not aligned."""
        from .hessian import teacher_target_weight   # (hessian imports this module)

        if not self.aligned:
            return weight_matrix.to(torch.float64)
        self.check()
        try:
            return teacher_target_weight(weight_matrix, self.hessian, self.cross, damp).to(weight_matrix.device)
        except ValueError as e:
            raise ValueError(f"layer {self.layer!r}: {e}") from None

    def select_target(self, weight_matrix: Tensor, held: "TeacherTargetStats") -> tuple[float | None, Tensor]:
        """``hessian.target_damp: auto``: the damp whose ``W*`` best reproduces the teacher's outputs on
        the ``held``-out images' statistics, and that ``W*`` (None and ``W``: no ``W*`` beats ``W``;
        :func:`~bgd_dist.core.hessian.select_target_damp`)."""
        from .hessian import select_target_damp

        if not (self.aligned and held.aligned):
            raise ValueError(f"layer {self.layer!r}: the target damping is chosen on paired rows; "
                             f"these do not pair with the teacher's")
        self.check()
        held.check()
        damp, target = select_target_damp(weight_matrix, self.hessian, self.cross, held.hessian, held.cross)
        return damp, target.to(weight_matrix.device)


@register_stats
@dataclass
class IdentityStats:
    """The weights-only baseline: the metric is the identity (classic PQ)."""

    name: ClassVar[str] = "identity"
    geometry: LayerGeometry
    block_size: int
    layer: str = "<layer>"

    @classmethod
    def empty(cls, geometry: LayerGeometry, block_size: int, layer: str = "<layer>", **_) -> "IdentityStats":
        check_block_size(geometry, block_size, layer)
        return cls(geometry, block_size, layer)

    def update(self, x: Tensor) -> None:  # nothing to accumulate
        pass

    def merge(self, other: "IdentityStats") -> "IdentityStats":
        if not isinstance(other, IdentityStats) or other.block_size != self.block_size \
                or other.geometry != self.geometry:
            raise ValueError(f"layer {self.layer!r}: cannot merge statistics of a different layer or block size")
        return self

    def metric(self) -> Tensor:
        return torch.eye(self.block_size, dtype=torch.float64)

    def check(self) -> None:
        pass

    def state(self) -> dict:
        return {"type": self.name, "geometry": self.geometry.to_dict(), "block_size": self.block_size,
                "layer": self.layer}

    nbytes = 0


def make_stats(kind: str, geometry: LayerGeometry, block_size: int, layer: str = "<layer>", **kwargs):
    """An empty statistics object of type ``kind`` (``gram``, ``hessian`` or ``identity``)."""
    try:
        cls = STATS_TYPES[kind]
    except KeyError:
        raise ValueError(f"layer {layer!r}: unknown statistics type {kind!r}; expected one of {sorted(STATS_TYPES)}")
    return cls.empty(geometry, block_size, layer, **kwargs)


def stats_from_state(state: dict):
    state = dict(state)
    cls = STATS_TYPES[state.pop("type")]
    if state.get("geometry") is not None:
        state["geometry"] = LayerGeometry.from_dict(state["geometry"])
    return cls(**state)


def merge_all(parts: list):
    """Sum a non-empty list of statistics of the same layer, in list order (deterministic)."""
    if not parts:
        raise ValueError("no statistics to merge")
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


@register_stats
@dataclass
class ChannelMoments:
    """Per-channel sums of a tensor's values and squares over every position but the channel
    (dimension 1), float64; additive over images like the matrices above. Collected on the
    inputs of BatchNorm layers to re-estimate their running statistics."""

    name: ClassVar[str] = "channel_moments"
    geometry: None
    block_size: int
    sums: Tensor
    squares: Tensor
    count: int = 0
    layer: str = "<layer>"

    @classmethod
    def empty(cls, geometry=None, block_size: int = 1, layer: str = "<layer>",
              device: torch.device | str | None = None, **_) -> "ChannelMoments":
        zeros = torch.zeros(0, dtype=torch.float64, device=device)
        return cls(None, block_size, zeros, zeros.clone(), 0, layer)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"layer {self.layer!r}: channel moments need a (N, C, ...) input, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"layer {self.layer!r}: non-finite values in the layer input")
        values = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        if self.count == 0:
            self.sums = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.squares = torch.zeros_like(self.sums)
        elif values.shape[0] != self.sums.shape[0]:
            raise ValueError(f"layer {self.layer!r}: {values.shape[0]} channels, expected {self.sums.shape[0]}")
        self.sums = self.sums.to(x.device) + values.sum(1)
        self.squares = self.squares.to(x.device) + (values * values).sum(1)
        self.count += values.shape[1]

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        if not isinstance(other, ChannelMoments):
            raise ValueError(f"layer {self.layer!r}: cannot merge statistics of a different type")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if other.sums.shape != self.sums.shape:
            raise ValueError(f"layer {self.layer!r}: cannot merge moments of {other.sums.numel()} and "
                             f"{self.sums.numel()} channels")
        return type(self)(self.geometry, self.block_size, self.sums + other.sums.to(self.sums.device),
                              self.squares + other.squares.to(self.sums.device), self.count + other.count,
                              self.layer)

    def check(self) -> None:
        if self.count == 0:
            raise ValueError(f"layer {self.layer!r}: empty statistics (no calibration input reached this layer)")

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance, float64."""
        self.check()
        mean = self.sums / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0.0)

    def state(self) -> dict:
        return {"type": self.name, "geometry": None, "block_size": self.block_size, "sums": self.sums.cpu(),
                "squares": self.squares.cpu(), "count": self.count, "layer": self.layer}

    @property
    def nbytes(self) -> int:
        return 2 * self.sums.numel() * self.sums.element_size()


@register_stats
@dataclass
class InputMoments(ChannelMoments):
    """:class:`ChannelMoments` of a quantizable layer's input channels: axis 1 of a convolution's
    input, the last axis of a linear layer's (the scales of channel permutations)."""

    name: ClassVar[str] = "input_moments"

    @classmethod
    def empty(cls, geometry: LayerGeometry | None = None, block_size: int = 1, layer: str = "<layer>",
              device: torch.device | str | None = None, **_) -> "InputMoments":
        zeros = torch.zeros(0, dtype=torch.float64, device=device)
        return cls(geometry, block_size, zeros, zeros.clone(), 0, layer)

    def update(self, x: Tensor) -> None:
        if self.geometry is not None and self.geometry.kind == "linear":
            x = x.reshape(-1, x.shape[-1])
        super().update(x)

    def state(self) -> dict:
        return {**super().state(), "type": self.name,
                "geometry": self.geometry.to_dict() if self.geometry is not None else None}
