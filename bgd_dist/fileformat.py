"""The compressed model file ``model.bgd``: one self-contained, pickle-free file.

A ``.bgd`` file holds everything needed to rebuild the compressed network: the
architecture (an import path of a factory and its JSON keyword arguments), the
per-layer plan, per quantized layer its centroids (fp16) and its assignments
bit-packed at ``ceil(log2(K))`` bits per index, and every other entry of the
model's ``state_dict`` (biases, uncompressed layers, BatchNorm affine
parameters AND running statistics, ``num_batches_tracked``) at its own dtype.
Loading needs neither Ray nor the training data and never unpickles anything.

Layout (all integers little-endian)::

    offset  size  content
    0       8     magic  b"BGDMODEL"
    8       4     u32    format version (currently 1)
    12      4     u32    reserved, 0
    16      8     u64    H: header length in bytes
    24      32    sha256 of the H header bytes
    56      H     header: UTF-8 JSON, padded with spaces so that 56 + H is a
                  multiple of 8
    56 + H  P     payload: the tensors' raw little-endian bytes, each starting
                  at a payload offset that is a multiple of 8 (zero padding)

The file ends exactly at ``56 + H + P``. The JSON header is::

    {
      "format": "bgd-model",
      "version": 1,
      "byteorder": "little",
      "producer": "bgd-dist <version>",
      "arch": {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 1000}},
      "plan": <Plan.to_dict()>,
      "metadata": {...},                      # free-form JSON (metrics, provenance)
      "tensors": {                            # one entry per state_dict key, in state_dict order
        "<key>": {"encoding": "raw", "dtype": "float32", "shape": [64, 3, 7, 7],
                  "offset": 0, "nbytes": 37632},
        "<layer>.centroids": {"encoding": "raw", "dtype": "float16", "shape": [K, d],
                              "model_dtype": "float32", "offset": ..., "nbytes": ...},
        "<layer>.assignments": {"encoding": "bitpack", "bits": 8, "dtype": "int64",
                                "shape": [n_subvectors], "offset": ..., "nbytes": ...}
      },
      "payload_nbytes": P,
      "payload_sha256": "<hex>"
    }

``offset`` is relative to the start of the payload. ``model_dtype`` is the
dtype the tensor takes in the loaded model (centroids are stored in fp16 and
trained in fp32). A ``bitpack`` tensor stores ``shape[0]`` non-negative
integers of ``bits`` bits each as one little-endian bit stream: index ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, bit ``b`` of the stream
being bit ``b % 8`` of byte ``b // 8``; ``nbytes = ceil(shape[0]*bits/8)`` and
``bits = 0`` (K = 1) stores nothing. Assignments are in the reference's
unrolled (block-major) order of :mod:`bgd_dist.core.layouts`.

Loading imports the factory only from an allow-list of module prefixes
(:data:`DEFAULT_FACTORY_PREFIXES`, extended with
:func:`register_factory_prefix`), calls it with the kwargs, swaps the planned
layers for quantized modules and loads every state tensor strictly.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .core.kmeans import Codebook
from .core.layouts import geometry_of
from .core.sizing import MB, size_report
from .io import atomic_write
from .nn.modules import PQLayer, get_submodule, pq_layers, quantize_
from .plan import Plan

MAGIC = b"BGDMODEL"
FORMAT_NAME = "bgd-model"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ32s")   # magic, version, reserved, header length, header sha256
PREFIX_NBYTES = _PREFIX.size           # 56
ALIGN = 8

DEFAULT_FACTORY_PREFIXES = ("torchvision.models", "classification", "detection", "bgd_dist")
_factory_prefixes: list[str] = list(DEFAULT_FACTORY_PREFIXES)

# dtypes a file may contain (name in the header -> torch dtype); nothing is eval'ed
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "complex64", "complex128",
                 "int64", "int32", "int16", "int8", "uint8", "bool")
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FormatError(ValueError):
    """A ``.bgd`` file is unreadable, inconsistent, or cannot be written; the message names the file."""


# ----------------------------------------------------------------------------- bit packing

def packed_bits(n_centroids: int) -> int:
    """Bits per stored index: ``ceil(log2(K))``; 0 for K = 1."""
    if n_centroids < 1:
        raise ValueError(f"n_centroids must be >= 1, got {n_centroids}")
    return (int(n_centroids) - 1).bit_length()


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes used by ``count`` indexes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_indexes(indexes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers into a little-endian bit stream.

    indexes: (N,) integer tensor with values in ``[0, 2**bits)``; bits in 0..32.
    Returns (ceil(N * bits / 8),) uint8 on the CPU. Vectorised: the only loop is
    over the (at most 5) bytes an index can touch.
    """
    if not 0 <= bits <= 32:
        raise ValueError(f"bits must be in 0..32, got {bits}")
    if indexes.is_floating_point() or indexes.is_complex() or indexes.dtype == torch.bool:
        raise TypeError(f"indexes must be an integer tensor, got {indexes.dtype}")
    idx = indexes.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    n = idx.numel()
    if n and (int(idx.min()) < 0 or int(idx.max()) >= 2 ** bits):
        raise ValueError(f"indexes must be in [0, {2 ** bits}) to be packed at {bits} bits; "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")
    nbytes = packed_nbytes(n, bits)
    if bits == 0 or n == 0:
        return torch.zeros(nbytes, dtype=torch.uint8)
    if bits == 8:
        return idx.to(torch.uint8)
    if bits % 8 == 0:  # whole bytes: little-endian byte planes
        shifts = torch.arange(0, bits, 8, dtype=torch.int64)
        return ((idx.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    byte, shift = pos >> 3, pos & 7
    value = idx << shift                      # < 2**(bits + 7)
    span = (bits + 7 + 7) // 8                # bytes one index can touch
    out = torch.zeros(nbytes + span, dtype=torch.int64)
    for k in range(span):
        # contributions of different indexes to one byte occupy disjoint bits: sum == or
        out.index_add_(0, byte + k, (value >> (8 * k)) & 0xFF)
    return out[:nbytes].to(torch.uint8)


def unpack_indexes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_indexes`.

    packed: (ceil(count * bits / 8),) uint8. Returns (count,) int64 on packed's device.
    """
    if not 0 <= bits <= 32:
        raise ValueError(f"bits must be in 0..32, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-d uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_nbytes(count, bits)
    if packed.numel() != expected:
        raise ValueError(f"{count} indexes of {bits} bits need {expected} bytes, got {packed.numel()}")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=packed.device)
    if bits == 8:
        return packed.to(torch.int64)
    if bits % 8 == 0:
        shifts = torch.arange(0, bits, 8, dtype=torch.int64, device=packed.device)
        return (packed.reshape(count, bits // 8).to(torch.int64) << shifts).sum(1)
    span = (bits + 7 + 7) // 8
    padded = torch.cat([packed, packed.new_zeros(span)]).to(torch.int64)
    pos = torch.arange(count, dtype=torch.int64, device=packed.device) * bits
    byte, shift = pos >> 3, pos & 7
    value = padded[byte]
    for k in range(1, span):
        value |= padded[byte + k] << (8 * k)
    return (value >> shift) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------- byte order

def _swap_bytes(t: Tensor) -> Tensor:
    """Reverse the byte order of every element of a contiguous tensor (same dtype and shape)."""
    size = t.element_size()
    if size == 1 or t.numel() == 0:
        return t
    raw = t.reshape(-1).view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return raw.reshape(-1).view(t.dtype).reshape(t.shape)


def _to_le_bytes(t: Tensor) -> Tensor:
    """(any shape) tensor -> (nbytes,) uint8 of its little-endian representation (CPU)."""
    t = t.detach().to("cpu").contiguous()
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        t = _swap_bytes(t)
    return t.reshape(-1).view(torch.uint8)


def _from_le_bytes(raw: Tensor, dtype: torch.dtype, shape: list[int]) -> Tensor:
    """(nbytes,) uint8 little-endian bytes -> tensor of ``dtype`` and ``shape`` (a fresh copy)."""
    t = raw.clone().view(dtype).reshape(shape)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        t = _swap_bytes(t)
    return t


# ----------------------------------------------------------------------------- factories

def register_factory_prefix(prefix: str) -> None:
    """Allow :func:`load_compressed` to import architecture factories from modules under ``prefix``
    (a dotted module path, e.g. ``"mypackage.models"``)."""
    if not isinstance(prefix, str) or not all(_IDENT.fullmatch(p) for p in prefix.split(".")):
        raise ValueError(f"factory prefix must be a dotted module path, got {prefix!r}")
    if prefix not in _factory_prefixes:
        _factory_prefixes.append(prefix)


def factory_prefixes() -> tuple[str, ...]:
    """The module prefixes factories may currently be imported from."""
    return tuple(_factory_prefixes)


def check_arch(arch: Any) -> dict:
    """Validate ``{"factory": "module:function", "kwargs": {...}}``; returns a normalised copy."""
    if not isinstance(arch, dict):
        raise ValueError(f"arch must be a dict {{'factory': 'module:function', 'kwargs': {{...}}}}, got {arch!r}")
    unknown = set(arch) - {"factory", "kwargs"}
    if unknown:
        raise ValueError(f"arch has unknown keys {sorted(unknown)}; expected 'factory' and 'kwargs'")
    factory = arch.get("factory")
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"arch factory must be a 'module:function' string, got {factory!r}")
    module_name, attr = factory.split(":")
    if not all(_IDENT.fullmatch(p) for p in module_name.split(".")):
        raise ValueError(f"arch factory {factory!r}: {module_name!r} is not a module path")
    if not all(_IDENT.fullmatch(p) and not p.startswith("_") for p in attr.split(".")):
        raise ValueError(f"arch factory {factory!r}: {attr!r} is not a public attribute path")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"arch kwargs must be a dict with string keys, got {kwargs!r}")
    try:
        kwargs = json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"arch kwargs must be plain JSON values: {e}") from None
    return {"factory": factory, "kwargs": kwargs}


def _allowed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in _factory_prefixes)


def resolve_factory(factory: str) -> Callable[..., nn.Module]:
    """Import ``"module:function"`` if the module is under an allowed prefix."""
    factory = check_arch({"factory": factory})["factory"]
    module_name, attr = factory.split(":")
    if not _allowed(module_name):
        raise ValueError(
            f"architecture factory {factory!r} is not in the allow-list of module prefixes "
            f"{list(_factory_prefixes)}; call bgd_dist.fileformat.register_factory_prefix({module_name!r}) "
            f"if you trust it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import the module of architecture factory {factory!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"architecture factory {factory!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"architecture factory {factory!r} is not callable")
    return obj


def build_arch(arch: dict, device: str | torch.device | None = None) -> nn.Module:
    """Call the (allow-listed) factory of ``arch`` with its kwargs.

    ``device="meta"`` builds the module structure without allocating or
    initialising anything (the factory's module is imported outside the meta
    context, so its import-time tensors are real).
    """
    arch = check_arch(arch)
    fn = resolve_factory(arch["factory"])
    try:
        if device is None:
            model = fn(**arch["kwargs"])
        else:
            with torch.device(device):
                model = fn(**arch["kwargs"])
    except Exception as e:  # any failure of third-party construction code, reported with its arguments
        raise ValueError(f"architecture factory {arch['factory']!r} failed with kwargs {arch['kwargs']}: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture factory {arch['factory']!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _build_uninitialised(arch: dict) -> nn.Module:
    """The architecture on the CPU with its tensors allocated but not initialised.

    Loading overwrites every persistent tensor, so the factory's random
    initialisation is wasted work (a third of a ResNet-50 decode). Falls back to
    a normal construction when the factory does not run on the meta device or
    the model has non-persistent buffers (which the file does not hold).
    """
    try:
        model = build_arch(arch, device="meta")
    except ValueError:
        return build_arch(arch)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers(remove_duplicate=False)) \
            or any(_holds_plain_tensor(vars(m)) for m in model.modules()):
        return build_arch(arch)
    return model.to_empty(device="cpu")


def _holds_plain_tensor(attrs: dict) -> bool:
    """Whether a module's ``__dict__`` holds tensors outside its parameters and buffers (e.g.
    torchvision's ``AnchorGenerator.cell_anchors``, a list of tensors): ``to_empty`` would leave
    them on the meta device."""
    def holds(value, depth: int) -> bool:
        if isinstance(value, Tensor):
            return True
        if depth < 3 and isinstance(value, (list, tuple)):
            return any(holds(v, depth + 1) for v in value)
        if depth < 3 and isinstance(value, dict):
            return any(holds(v, depth + 1) for v in value.values())
        return False
    return any(holds(v, 0) for k, v in attrs.items() if k not in ("_parameters", "_buffers", "_modules"))


# ----------------------------------------------------------------------------- writing

def _check_model_against_plan(model: nn.Module, plan: Plan) -> dict[str, PQLayer]:
    """The PQ layers of ``model``; raises unless they are exactly the plan's non-skipped layers."""
    pq = pq_layers(model)
    for entry in plan.layers:
        if entry.skip:
            if entry.name in pq:
                raise ValueError(f"layer {entry.name!r} is quantized in the model but skipped in the plan")
            get_submodule(model, entry.name)  # must exist
            continue
        module = pq.get(entry.name)
        if module is None:
            try:
                found = type(get_submodule(model, entry.name)).__name__
            except KeyError:
                found = "nothing"
            raise ValueError(f"layer {entry.name!r} is quantized in the plan but the model has {found} there; "
                             f"quantize every non-skipped plan layer before saving")
        if module.geometry != entry.geometry:
            raise ValueError(f"layer {entry.name!r}: model geometry {module.geometry} differs from the plan's "
                             f"{entry.geometry}")
        if module.block_size != entry.block_size:
            raise ValueError(f"layer {entry.name!r}: block size {module.block_size} != plan's {entry.block_size}")
        if module.n_centroids != entry.n_centroids:
            raise ValueError(f"layer {entry.name!r}: {module.n_centroids} centroids != plan's {entry.n_centroids}")
    planned = {l.name for l in plan.quantized}
    extra = sorted(set(pq) - planned)
    if extra:
        raise ValueError(f"layers {extra} are quantized in the model but not in the plan")
    return pq


def _encode_state(model: nn.Module, plan: Plan) -> tuple[dict, list[Tensor], int, str]:
    """state_dict -> (tensor table, payload pieces incl. padding, payload length, sha256 hex)."""
    pq = _check_model_against_plan(model, plan)
    special: dict[str, tuple[str, PQLayer]] = {}
    for name, module in pq.items():
        special[f"{name}.centroids"] = ("centroids", module)
        special[f"{name}.assignments"] = ("assignments", module)
    table: dict[str, dict] = {}
    pieces: list[Tensor] = []
    sha = hashlib.sha256()
    offset = 0
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state entry {key!r} is a {type(value).__name__}, not a tensor; "
                             f"extra state cannot be stored")
        role = special.get(key)
        if role is not None and role[0] == "centroids":
            layer = key[: -len(".centroids")]
            c16 = value.detach().to(torch.float16)
            if not torch.isfinite(c16).all():
                raise ValueError(f"layer {layer!r}: centroids are not finite in float16 "
                                 f"(max |c| = {float(value.detach().abs().max()):.4g}, fp16 max is 65504)")
            entry = {"encoding": "raw", "dtype": "float16", "shape": list(value.shape),
                     "model_dtype": _dtype_name(value.dtype, key)}
            data = _to_le_bytes(c16)
        elif role is not None:
            module = role[1]
            bits = packed_bits(module.n_centroids)
            entry = {"encoding": "bitpack", "bits": bits, "dtype": "int64", "shape": [value.numel()]}
            data = pack_indexes(value, bits)
        else:
            entry = {"encoding": "raw", "dtype": _dtype_name(value.dtype, key), "shape": list(value.shape)}
            data = _to_le_bytes(value)
        pad = -offset % ALIGN
        if pad:
            padding = torch.zeros(pad, dtype=torch.uint8)
            pieces.append(padding)
            sha.update(padding.numpy())
            offset += pad
        entry["offset"] = offset
        entry["nbytes"] = data.numel()
        table[key] = entry
        pieces.append(data)
        sha.update(data.numpy())
        offset += data.numel()
    return table, pieces, offset, sha.hexdigest()


def _dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"state entry {key!r} has dtype {dtype}, which the file format does not support") from None


def save_compressed(path: str | Path, model: nn.Module, plan: Plan, arch: dict,
                    metadata: dict | None = None) -> int:
    """Write ``model`` (quantized per ``plan``) to ``path`` atomically; returns the file size in bytes.

    ``arch`` = ``{"factory": "module:function", "kwargs": {...}}`` rebuilds the
    dense architecture; its module must be allow-listed (see
    :func:`register_factory_prefix`). Every non-skipped plan layer must be a
    quantized module in ``model``. ``metadata`` is any JSON-serialisable dict.
    A failure leaves no file (and no temporary file) behind.
    """
    path = Path(path)
    try:
        arch = check_arch(arch)
        module_name = arch["factory"].split(":")[0]
        if not _allowed(module_name):
            raise ValueError(f"architecture factory {arch['factory']!r} is not in the allow-list "
                             f"{list(_factory_prefixes)}; the file could not be loaded "
                             f"(call register_factory_prefix({module_name!r}) first)")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
        table, pieces, payload_nbytes, digest = _encode_state(model, plan)
    except (ValueError, KeyError) as e:
        raise FormatError(f"{path}: cannot save: {_msg(e)}") from None
    from . import __version__

    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "byteorder": "little",
        "producer": f"bgd-dist {__version__}", "arch": arch, "plan": plan.to_dict(), "metadata": metadata,
        "tensors": table, "payload_nbytes": payload_nbytes, "payload_sha256": digest,
    }
    prefix, header_bytes = _encode_header(header)

    def write(f) -> None:
        f.write(prefix)
        f.write(header_bytes)
        for piece in pieces:
            f.write(piece.numpy().data)

    atomic_write(path, write)
    return PREFIX_NBYTES + len(header_bytes) + payload_nbytes


def _encode_header(header: dict) -> tuple[bytes, bytes]:
    """(fixed prefix, JSON header padded so that the payload starts 8-byte aligned)."""
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-(PREFIX_NBYTES + len(header_bytes)) % ALIGN)
    prefix = _PREFIX.pack(MAGIC, header["version"], 0, len(header_bytes), hashlib.sha256(header_bytes).digest())
    return prefix, header_bytes


def _msg(e: BaseException) -> str:
    # KeyError's str() is the repr of its argument; keep messages readable
    return e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)


# ----------------------------------------------------------------------------- reading

def _describe_foreign(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "it looks like a zip archive (a torch.save checkpoint?); load those with torch.load"
    if head[:1] == b"\x80":
        return "it looks like a pickle (a legacy torch.save checkpoint?); load those with torch.load"
    if not head:
        return "it is empty"
    return f"it starts with {head[:8]!r}, expected {MAGIC!r}"


def _read_prefix_and_header(f, path: Path, file_nbytes: int) -> tuple[dict, int]:
    """Parse and validate the fixed prefix and the JSON header; returns (header, payload start)."""
    head = f.read(PREFIX_NBYTES)
    if not head.startswith(MAGIC):
        if head and MAGIC.startswith(head):
            raise FormatError(f"{path}: file is truncated: expected at least {PREFIX_NBYTES} bytes, "
                              f"got {len(head)}")
        raise FormatError(f"{path}: not a bgd file: {_describe_foreign(head)}")
    if len(head) < PREFIX_NBYTES:
        raise FormatError(f"{path}: file is truncated: expected at least {PREFIX_NBYTES} bytes, "
                          f"got {len(head)}")
    _, version, _, header_nbytes, header_sha = _PREFIX.unpack(head)
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version} is newer than this reader supports "
                          f"({FORMAT_VERSION}); upgrade bgd-dist")
    if version < 1:
        raise FormatError(f"{path}: invalid format version {version}")
    if PREFIX_NBYTES + header_nbytes > file_nbytes:
        raise FormatError(f"{path}: file is truncated: the header needs {PREFIX_NBYTES + header_nbytes} bytes, "
                          f"the file has {file_nbytes}")
    header_bytes = f.read(header_nbytes)
    if hashlib.sha256(header_bytes).digest() != header_sha:
        raise FormatError(f"{path}: header checksum mismatch: the file is corrupted")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a bgd file: header format is "
                          f"{header.get('format') if isinstance(header, dict) else None!r}")
    if header.get("version") != version:
        raise FormatError(f"{path}: corrupt header: version {header.get('version')!r} != prefix version {version}")
    for key in ("arch", "plan", "tensors", "payload_nbytes", "payload_sha256"):
        if key not in header:
            raise FormatError(f"{path}: corrupt header: missing {key!r}")
    return header, PREFIX_NBYTES + header_nbytes


def read_header(path: str | Path) -> dict:
    """The validated JSON header of a ``.bgd`` file (reads only the prefix and the header)."""
    path = Path(path)
    with _open(path) as f:
        header, _ = _read_prefix_and_header(f, path, path.stat().st_size)
    return header


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def _read_payload(path: Path) -> tuple[dict, Tensor]:
    """Header and the verified payload as a (P,) uint8 tensor."""
    file_nbytes = path.stat().st_size
    with _open(path) as f:
        header, start = _read_prefix_and_header(f, path, file_nbytes)
        expected = header["payload_nbytes"]
        if not isinstance(expected, int) or expected < 0:
            raise FormatError(f"{path}: corrupt header: payload_nbytes={expected!r}")
        actual = file_nbytes - start
        if actual < expected:
            raise FormatError(f"{path}: file is truncated: expected {start + expected} bytes "
                              f"({expected} payload bytes), got {file_nbytes} ({actual} payload bytes)")
        if actual > expected:
            raise FormatError(f"{path}: file has {actual - expected} unexpected trailing bytes "
                              f"(expected {start + expected} bytes, got {file_nbytes})")
        buf = bytearray(expected)
        if f.readinto(buf) != expected:
            raise FormatError(f"{path}: file is truncated: could not read {expected} payload bytes")
    if hashlib.sha256(buf).hexdigest() != header["payload_sha256"]:
        raise FormatError(f"{path}: payload checksum mismatch (sha256): the file is corrupted")
    payload = torch.frombuffer(buf, dtype=torch.uint8) if expected else torch.zeros(0, dtype=torch.uint8)
    return header, payload


def _check_entry(key: str, e: Any, payload_nbytes: int) -> None:
    if not isinstance(e, dict):
        raise ValueError(f"tensor {key!r}: entry is not an object")
    dtype = _DTYPES.get(e.get("dtype"))
    if dtype is None:
        raise ValueError(f"tensor {key!r}: unknown dtype {e.get('dtype')!r}")
    if "model_dtype" in e and e["model_dtype"] not in _DTYPES:
        raise ValueError(f"tensor {key!r}: unknown model dtype {e['model_dtype']!r}")
    shape, offset, nbytes = e.get("shape"), e.get("offset"), e.get("nbytes")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"tensor {key!r}: invalid shape {shape!r}")
    if not isinstance(offset, int) or not isinstance(nbytes, int) or offset < 0 or nbytes < 0 \
            or offset + nbytes > payload_nbytes:
        raise ValueError(f"tensor {key!r}: bytes [{offset}, {offset}+{nbytes}) outside the payload "
                         f"of {payload_nbytes} bytes")
    encoding = e.get("encoding")
    if encoding == "raw":
        want = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    elif encoding == "bitpack":
        bits = e.get("bits")
        if dtype != torch.int64 or len(shape) != 1 or not isinstance(bits, int) or not 0 <= bits <= 32:
            raise ValueError(f"tensor {key!r}: invalid bitpack entry {e}")
        want = packed_nbytes(shape[0], bits)
    else:
        raise ValueError(f"tensor {key!r}: unknown encoding {encoding!r}")
    if nbytes != want:
        raise ValueError(f"tensor {key!r}: {nbytes} bytes stored, {want} expected for its dtype and shape")


def _decode_tensor(key: str, e: dict, payload: Tensor) -> Tensor:
    raw = payload[e["offset"]: e["offset"] + e["nbytes"]]
    if e["encoding"] == "bitpack":
        return unpack_indexes(raw, e["bits"], e["shape"][0])
    t = _from_le_bytes(raw, _DTYPES[e["dtype"]], e["shape"])
    if "model_dtype" in e:
        t = t.to(_DTYPES[e["model_dtype"]])
    return t


def _match_dtypes(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give the model's tensors the file's dtypes where they differ (e.g. a model saved in half precision)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    for key, value in state.items():
        t = named.get(key)
        if t is not None and t.dtype != value.dtype:
            t.data = t.data.to(value.dtype)


def load_compressed(path: str | Path, map_location: str | torch.device = "cpu", dense: bool = False,
                    model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model stored in a ``.bgd`` file; returns it in eval mode on ``map_location``.

    ``dense=True`` returns the original architecture with plain layers, their weights the decoded
    ones (:func:`bgd_dist.export.to_dense`): its state dict loads into the architecture with
    ``strict=True``. Otherwise the planned layers are quantized modules (trainable centroids;
    eval-mode inference decodes each weight once, see :mod:`bgd_dist.nn.modules`).

    The architecture is built by the allow-listed factory, every stored tensor
    but the codes is loaded into it strictly (the only keys the dense model may
    lack are the planned layers' dense weights), then the planned layers are
    swapped for quantized modules built from the codes (centroids fp16 -> the
    saved model dtype, assignments unpacked) and the resulting state keys are
    checked to be exactly the stored ones. Errors are :class:`FormatError`
    naming the file.

    ``model``: the dense architecture to load into instead of the one the file
    records (a user's own class, see :mod:`bgd_dist.api`); it is modified in place.
    """
    path = Path(path)
    header, payload = _read_payload(path)
    try:
        plan = Plan.from_dict(header["plan"])
        table = header["tensors"]
        if not isinstance(table, dict):
            raise ValueError("tensor table is not an object")
        for key, entry in table.items():
            _check_entry(key, entry, payload.numel())
        state = {key: _decode_tensor(key, entry, payload) for key, entry in table.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: corrupt header: {_msg(e)}") from None
    model = assemble(path, header["arch"], plan, state, model)
    if dense:
        from .nn.modules import dequantize_

        dequantize_(model)
    return model.to(map_location)


def assemble(path: Path, arch: dict, plan: Plan, state: dict[str, Tensor],
             model: nn.Module | None = None) -> nn.Module:
    """The quantized model (eval mode) from decoded state tensors: the architecture (``model``, a dense
    instance of it, or built from ``arch``), every tensor but the codes loaded strictly, the planned
    layers swapped for quantized modules built from the codes. Errors are :class:`FormatError`
    naming ``path``."""
    try:
        if model is None:
            model = _build_uninitialised(arch)
        elif not isinstance(model, nn.Module) or pq_layers(model):
            raise ValueError("model= must be a dense nn.Module of the file's architecture")
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    try:
        codebooks = {}
        for entry in plan.quantized:
            for part in ("centroids", "assignments"):
                if f"{entry.name}.{part}" not in state:
                    raise ValueError(f"layer {entry.name!r} is quantized in the plan but the file has no "
                                     f"{entry.name}.{part}")
            centroids = state[f"{entry.name}.centroids"]
            if tuple(centroids.shape) != (entry.n_centroids, entry.block_size):
                raise ValueError(f"layer {entry.name!r}: centroids of shape {tuple(centroids.shape)}, the plan "
                                 f"says ({entry.n_centroids}, {entry.block_size})")
            codebooks[entry.name] = Codebook(centroids, state[f"{entry.name}.assignments"], ())
        for entry in plan.layers:  # the architecture must be the one the plan was made for
            geometry = geometry_of(get_submodule(model, entry.name))
            if geometry != entry.geometry:
                raise ValueError(f"layer {entry.name!r}: architecture {arch['factory']!r} with kwargs "
                                 f"{arch['kwargs']} has {geometry}, the plan says {entry.geometry}")
        # 1. everything but the codes goes into the dense model (strict: the only keys it may
        #    lack are the dense weights of the planned layers, which the codes replace) ...
        codes = {f"{name}.{part}" for name in codebooks for part in ("centroids", "assignments")}
        dense_state = {k: v for k, v in state.items() if k not in codes}
        replaced = {f"{name}.weight" for name in codebooks}
        _match_dtypes(model, dense_state)
        result = model.load_state_dict(dense_state, strict=False)
        missing = [k for k in result.missing_keys if k not in replaced]
        if missing or result.unexpected_keys:
            raise ValueError(f"the stored state does not match architecture {arch['factory']!r}: "
                             f"missing keys {_few(missing)}, unexpected keys {_few(result.unexpected_keys)}")
        # 2. ... then the planned layers are swapped for quantized ones built from the codes
        #    (their biases come from the dense layers loaded above).
        quantize_(model, plan, codebooks)
        layers = pq_layers(model)
        for name, layer in layers.items():
            dtype = state[f"{name}.centroids"].dtype
            if layer.centroids.dtype != dtype:
                layer.centroids.data = layer.centroids.data.to(dtype)
        if set(model.state_dict()) != set(state):  # the swap must yield exactly the stored keys
            keys = set(model.state_dict())
            raise ValueError(f"the stored state does not match the quantized model: missing keys "
                             f"{_few(sorted(keys - set(state)))}, unexpected keys {_few(sorted(set(state) - keys))}")
    except (ValueError, KeyError, RuntimeError) as e:
        raise FormatError(f"{path}: {_msg(e)}") from None
    return model.eval()


def update_metadata(path: str | Path, updates: dict) -> None:
    """Merge ``updates`` (JSON-serialisable) into the file's metadata, rewriting it atomically; the
    payload (the tensors) is copied unchanged and verified first."""
    path = Path(path)
    header, payload = _read_payload(path)
    try:
        merged = json.loads(json.dumps({**header.get("metadata", {}), **updates}))
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: cannot update metadata: it must be JSON-serialisable: {e}") from None
    prefix, header_bytes = _encode_header({**header, "metadata": merged})

    def write(f) -> None:
        f.write(prefix)
        f.write(header_bytes)
        f.write(payload.numpy().data)

    atomic_write(path, write)


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


# ----------------------------------------------------------------------------- inspection

def inspect_file(path: str | Path, accounted: bool = True) -> dict:
    """A JSON-serialisable summary of a ``.bgd`` file (checks length and checksums, decodes nothing).

    Per layer of the plan: name, kind, shape, d, K, index bits, bits per weight
    on disk, bytes on disk. Totals: file bytes, bytes of the other tensors and,
    with ``accounted=True``, the paper's accounted and uncompressed sizes
    (:func:`bgd_dist.core.sizing.size_report` on the architecture built on the
    meta device) and the compression ratios.
    """
    path = Path(path)
    header, payload = _read_payload(path)
    file_nbytes = path.stat().st_size
    try:
        plan = Plan.from_dict(header["plan"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: corrupt header: {_msg(e)}") from None
    table = header["tensors"]
    layers, in_layers = [], set()
    for entry in plan.layers:
        g = entry.geometry
        if entry.skip:
            keys = [k for k in (f"{entry.name}.weight", f"{entry.name}.bias") if k in table]
        else:
            keys = [f"{entry.name}.centroids", f"{entry.name}.assignments"]
        nbytes = sum(table[k]["nbytes"] for k in keys if k in table)
        weight_nbytes = sum(table[k]["nbytes"] for k in keys if k in table and not k.endswith(".bias"))
        in_layers.update(keys)
        layers.append({
            "name": entry.name, "kind": g.kind, "shape": list(g.weight_shape), "skip": entry.skip,
            "block_size": entry.block_size, "n_centroids": entry.n_centroids,
            "index_bits": None if entry.skip else packed_bits(entry.n_centroids),
            "bits_per_weight": weight_nbytes * 8 / g.n_weights, "nbytes": nbytes,
        })
    info: dict[str, Any] = {
        "path": str(path), "format": header["format"], "version": header["version"],
        "producer": header.get("producer"), "arch": header["arch"], "metadata": header.get("metadata", {}),
        "file_nbytes": file_nbytes, "header_nbytes": file_nbytes - PREFIX_NBYTES - payload.numel(),
        "payload_nbytes": payload.numel(), "layers": layers,
        "other_nbytes": sum(e["nbytes"] for k, e in table.items() if k not in in_layers),
    }
    if accounted and header["arch"].get("factory") != "bgd_dist.api:user_model":   # a user's class: no sizes
        try:
            model = build_arch(header["arch"], device="meta")
        except ValueError as e:
            raise FormatError(f"{path}: {e}") from None
        report = size_report(model, plan)
        info.update({
            "accounted_nbytes": report.compressed_bytes, "uncompressed_nbytes": report.uncompressed_bytes,
            "accounted_mb": report.compressed_mb, "uncompressed_mb": report.uncompressed_mb,
            "ratio": report.ratio, "disk_ratio": report.uncompressed_bytes / file_nbytes,
        })
    return info


def format_inspect(info: dict) -> str:
    """A readable table of :func:`inspect_file`'s result."""
    arch = info["arch"]
    lines = [
        f"{info['path']}: {info['format']} v{info['version']} ({info.get('producer') or 'unknown producer'})",
        f"arch: {arch['factory']}({', '.join(f'{k}={v!r}' for k, v in arch['kwargs'].items())})",
    ]
    name_w = max([len("layer")] + [len(l["name"]) for l in info["layers"]])
    head = (f"{'layer':<{name_w}}  {'kind':<16}  {'shape':<18}  {'d':>3}  {'K':>5}  {'bits':>4}  "
            f"{'bits/w':>7}  {'bytes':>10}")
    lines += [head, "-" * len(head)]
    for l in info["layers"]:
        shape = "x".join(str(s) for s in l["shape"])
        d = "-" if l["skip"] else str(l["block_size"])
        k = "skip" if l["skip"] else str(l["n_centroids"])
        bits = "-" if l["skip"] else str(l["index_bits"])
        lines.append(f"{l['name']:<{name_w}}  {l['kind']:<16}  {shape:<18}  {d:>3}  {k:>5}  {bits:>4}  "
                     f"{l['bits_per_weight']:>7.3f}  {l['nbytes']:>10,}")
    lines.append("-" * len(head))
    lines.append(f"other tensors (biases, BN parameters and statistics): {info['other_nbytes']:,} bytes; "
                 f"header {info['header_nbytes']:,} bytes")
    total = f"on disk: {info['file_nbytes']:,} bytes ({info['file_nbytes'] / MB:.3f} MB)"
    if "accounted_nbytes" in info:
        total += (f"; accounted (paper): {info['accounted_mb']:.3f} MB; uncompressed: "
                  f"{info['uncompressed_mb']:.2f} MB; ratio {info['ratio']:.1f}x accounted, "
                  f"{info['disk_ratio']:.1f}x on disk")
    lines.append(total)
    lines += format_deployment(info.get("metadata") or {})
    return "\n".join(lines)


def format_deployment(metadata: dict) -> list[str]:
    """Readable lines of the deployment metadata a file records: the pipeline it came from, the
    preprocessing, the class names, the evaluation metrics; other keys as JSON."""
    lines = []
    pipeline = metadata.get("pipeline")
    if pipeline:
        source = pipeline.get("checkpoint") or pipeline.get("weights") or "-"
        lines.append(f"pipeline: {pipeline.get('name')} (adapter {pipeline.get('adapter')}, arch "
                     f"{pipeline.get('arch')}, teacher {source}, objective {pipeline.get('objective')})")
    pre = metadata.get("preprocessing")
    if pre:
        lines.append("preprocessing: " + ", ".join(f"{k}={v}" for k, v in pre.items()))
    names = metadata.get("class_names")
    if names:
        shown = ", ".join(str(n) for n in names[:8])
        lines.append(f"classes ({len(names)}): {shown}{', ...' if len(names) > 8 else ''}")
    for which, values in (metadata.get("metrics") or {}).items():
        if values:
            lines.append(f"metrics ({which}): " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    rest = {k: v for k, v in metadata.items() if k not in ("pipeline", "preprocessing", "class_names", "metrics")}
    if rest:
        lines.append("metadata: " + json.dumps(rest, sort_keys=True))
    return lines
