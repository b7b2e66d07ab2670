"""Import the reference implementation's released checkpoints (kill-the-bits, METHOD.md §6).

The reference writes a ``torch.save`` dict keyed by module name:

- every quantized layer: ``{'centroids': fp16 (K, d), 'assignments': uint8 (int16 for
  the classifier) of length n_blocks * C_out in the unrolled order, 'n_blocks': int,
  'is_conv': bool, 'k': kernel size}``;
- ``'conv1'`` (and any other uncompressed conv, e.g. two layers of the semi-supervised
  ResNet-50): that layer's state dict, fp16;
- every BatchNorm2d: ``{'weight', 'bias'}`` in fp16, running statistics folded in, so
  they import as running_mean = 0 and running_var = 1 (if a file does carry
  ``running_mean`` / ``running_var``, those are used);
- ``'fc_bias'``: ``{'bias': ...}``.

Its reconstruction ``cat(centroids[assignments].t().chunk(n_blocks, dim=1), dim=0)``
followed by a transpose and reshape is exactly
:func:`bgd_dist.core.layouts.from_subvectors`, so the stored assignments are used
as they are.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ..core.kmeans import Codebook
from ..core.layouts import geometry_of
from ..fileformat import save_compressed
from ..nn.modules import quantize_
from ..plan import Plan, Rule, build_plan

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet50")
QUANTIZED_KEYS = ("centroids", "assignments", "n_blocks", "is_conv", "k")


class KtbImportError(ValueError):
    """A reference checkpoint does not match the format or the requested architecture."""


def assignments_to_long(assignments: Tensor, n_centroids: int, where: str = "<layer>") -> Tensor:
    """Stored assignments (uint8, int16 possibly wrapped negative, int32/int64) -> (N,) int64 in [0, K).

    The reference stores the classifier's indexes with ``.short()``: values of
    32768 and above wrap to negative numbers and are mapped back modulo 2**16.
    """
    a = assignments.reshape(-1)
    if a.dtype == torch.uint8:
        out = a.long()
    elif a.dtype == torch.int16:
        out = a.long() & 0xFFFF
    elif a.dtype in (torch.int32, torch.int64):
        out = a.long()
    else:
        raise KtbImportError(f"{where}: assignments have dtype {a.dtype}; expected uint8 or int16")
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= n_centroids):
        raise KtbImportError(f"{where}: assignments out of range [0, {n_centroids}): "
                             f"[{int(out.min())}, {int(out.max())}]")
    return out


def _load(src_path: Path) -> dict:
    try:
        state = torch.load(src_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{src_path}: no such file") from None
    except Exception as e:  # torch raises several types for unreadable / unsafe files
        raise KtbImportError(f"{src_path}: cannot read a reference checkpoint with torch.load "
                             f"(weights_only=True): {e}") from None
    if not isinstance(state, dict):
        raise KtbImportError(f"{src_path}: expected a dict keyed by module name, got {type(state).__name__}")
    return state


def _entry(state: dict, key: str, src: str) -> dict:
    if key not in state:
        raise KtbImportError(f"{src}: missing key {key!r}")
    entry = state[key]
    if not isinstance(entry, dict):
        raise KtbImportError(f"{src}: key {key!r} holds a {type(entry).__name__}, expected a dict")
    return entry


def _tensor(entry: dict, field: str, key: str, src: str) -> Tensor:
    if field not in entry:
        raise KtbImportError(f"{src}: missing key {key!r}[{field!r}]")
    value = entry[field]
    if not isinstance(value, Tensor):
        raise KtbImportError(f"{src}: {key!r}[{field!r}] is a {type(value).__name__}, expected a tensor")
    return value


def _set(param: Tensor, value: Tensor, what: str, src: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise KtbImportError(f"{src}: {what} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(param.shape)} (is this a checkpoint of another architecture?)")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _codebook(entry: dict, key: str, module: nn.Module, src: str) -> Codebook:
    missing = [f for f in QUANTIZED_KEYS if f not in entry]
    if missing:
        raise KtbImportError(f"{src}: missing key {key!r}[{missing[0]!r}]")
    geometry = geometry_of(module)
    centroids = _tensor(entry, "centroids", key, src)
    if centroids.dim() != 2 or not centroids.is_floating_point():
        raise KtbImportError(f"{src}: {key!r}['centroids'] must be a (K, d) float tensor, "
                             f"got {centroids.dtype} {tuple(centroids.shape)}")
    n_centroids, block_size = centroids.shape
    is_conv = bool(entry["is_conv"])
    if is_conv != (geometry.kind == "conv2d"):
        raise KtbImportError(f"{src}: {key!r}['is_conv'] is {is_conv} but the model's {key} is a {geometry.kind}")
    kernel = int(entry["k"])
    if is_conv and geometry.kernel_size != (kernel, kernel):
        raise KtbImportError(f"{src}: {key!r}['k'] is {kernel} but the model's {key} has kernel "
                             f"{geometry.kernel_size}")
    if geometry.row_length % block_size:
        raise KtbImportError(f"{src}: {key!r}: block size d={block_size} does not divide the row length "
                             f"{geometry.row_length} of weight {tuple(geometry.weight_shape)}")
    n_blocks = geometry.row_length // block_size
    if int(entry["n_blocks"]) != n_blocks:
        raise KtbImportError(f"{src}: {key!r}['n_blocks'] is {int(entry['n_blocks'])}, weight "
                             f"{tuple(geometry.weight_shape)} with d={block_size} has {n_blocks}")
    assignments = _tensor(entry, "assignments", key, src)
    if assignments.numel() != n_blocks * geometry.n_rows:
        raise KtbImportError(f"{src}: {key!r}['assignments'] has {assignments.numel()} values, expected "
                             f"n_blocks * C_out = {n_blocks} * {geometry.n_rows}")
    return Codebook(centroids.float(), assignments_to_long(assignments, n_centroids, f"{src}: {key!r}"), ())


def ktb_to_model(state: dict, arch: str, src: str = "<checkpoint>") -> tuple[nn.Module, Plan]:
    """A reference checkpoint dict -> (quantized torchvision model in eval mode, its plan).

    ``arch`` is ``"resnet18"`` or ``"resnet50"``; the number of classes is read from
    ``fc_bias``. Every Conv2d / Linear of the architecture must be in the file,
    quantized or as a plain state dict (then skipped in the plan).
    """
    if arch not in ARCHS:
        raise KtbImportError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    num_classes = _tensor(_entry(state, "fc_bias", src), "bias", "fc_bias", src).numel()
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = set(layers) | set(bns) | {"fc_bias"}
    missing = [k for k in list(layers) + list(bns) if k not in state]
    if missing:
        raise KtbImportError(f"{src}: missing key {missing[0]!r} ({len(missing)} layers of torchvision {arch} are "
                             f"not in the file; is it a checkpoint of another architecture?)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise KtbImportError(f"{src}: unexpected key {unexpected[0]!r}: not a layer of torchvision {arch} "
                             f"(is it a checkpoint of another architecture?)")

    codebooks: dict[str, Codebook] = {}
    rules: list[Rule] = []
    for name, module in layers.items():
        entry = _entry(state, name, src)
        if "centroids" in entry:
            cb = _codebook(entry, name, module, src)
            codebooks[name] = cb
            rules.append(Rule(re.escape(name), block_size=cb.block_size, n_centroids=cb.n_centroids))
        elif "weight" in entry:  # uncompressed layer: its state dict
            unknown = set(entry) - {"weight", "bias"}
            if unknown:
                raise KtbImportError(f"{src}: unexpected key {name!r}[{sorted(unknown)[0]!r}]")
            _set(module.weight, _tensor(entry, "weight", name, src), f"{name!r}['weight']", src)
            if "bias" in entry:
                if module.bias is None:
                    raise KtbImportError(f"{src}: {name!r} has a bias but the model's {name} has none")
                _set(module.bias, _tensor(entry, "bias", name, src), f"{name!r}['bias']", src)
            rules.append(Rule(re.escape(name), skip=True))
        else:
            raise KtbImportError(f"{src}: {name!r} has neither 'centroids' (quantized) nor 'weight' "
                                 f"(uncompressed); keys {sorted(entry)}")
    for name, bn in bns.items():
        entry = _entry(state, name, src)
        _set(bn.weight, _tensor(entry, "weight", name, src), f"{name!r}['weight']", src)
        _set(bn.bias, _tensor(entry, "bias", name, src), f"{name!r}['bias']", src)
        mean = entry.get("running_mean")
        var = entry.get("running_var")
        _set(bn.running_mean, mean if isinstance(mean, Tensor) else torch.zeros_like(bn.running_mean),
             f"{name!r}['running_mean']", src)
        _set(bn.running_var, var if isinstance(var, Tensor) else torch.ones_like(bn.running_var),
             f"{name!r}['running_var']", src)
    _set(model.fc.bias, state["fc_bias"]["bias"], "'fc_bias'['bias']", src)

    plan = build_plan(model, rules, run=lambda m: m(torch.zeros(1, 3, 64, 64)), clamp=False)
    quantize_(model, plan, codebooks)
    return model.eval(), plan


def import_ktb(src_path: str | Path, arch: str, out_path: str | Path, metadata: dict | None = None) -> Plan:
    """Convert a reference checkpoint (``torch.save`` dict, METHOD.md §6) into a ``.bgd`` file.

    ``arch``: ``"resnet18"`` or ``"resnet50"`` (torchvision, ``weights=None``).
    Returns the plan written into the file.
    """
    src_path = Path(src_path)
    state = _load(src_path)
    model, plan = ktb_to_model(state, arch, str(src_path))
    num_classes = model.fc.bias.numel()
    meta = {"source": "kill-the-bits", "source_file": src_path.name}
    meta.update(metadata or {})
    save_compressed(out_path, model, plan,
                    {"factory": f"torchvision.models:{arch}", "kwargs": {"num_classes": num_classes}}, meta)
    log.info("imported %s (%s, %d quantized layers) into %s", src_path, arch, len(plan.quantized), out_path)
    return plan
