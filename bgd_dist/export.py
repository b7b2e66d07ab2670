"""Deploying a compressed model: the plain dense network and standard formats.

A ``.bgd`` file decodes into the original architecture with plain layers
(:func:`to_dense`; ``load_compressed(path, dense=True)``): every quantized
layer becomes the ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` it
replaced, its weight the decoded one, so the state dict loads into the
architecture (e.g. a torchvision ResNet) with ``strict=True`` and the outputs
are the quantized model's. From there :func:`export_file` writes

- ``dense``: the dense ``state_dict`` (``torch.save``; ``torch.load(...,
  weights_only=True)`` reads it);
- ``torchscript``: ``torch.jit.script`` of the dense model (the deployment
  metadata in the archive's extra file ``bgd.json``);
- ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter; needs the
  ``onnx`` extra: onnx, onnxscript; onnxruntime to run it), one self-contained
  file, dynamic batch size, the metadata as ONNX ``metadata_props``;
- ``safetensors``: the dense ``state_dict`` as safetensors, the architecture,
  plan and metadata as JSON strings in its header.

Every file is written atomically (temporary name, then rename). The
deployment metadata (preprocessing, class names, pipeline, metrics) is the
``.bgd`` file's own, so an exported file carries what a deployer needs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_write, atomic_write_bytes
from .nn.modules import dequantize_, pq_layers

FORMATS = ("dense", "torchscript", "onnx", "safetensors")
SUFFIXES = {"dense": ".pt", "torchscript": ".ts.pt", "onnx": ".onnx", "safetensors": ".safetensors"}


def to_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers are plain dense layers with the decoded weights
    (the original architecture; same device, dtype and train/eval mode)."""
    return dequantize_(copy.deepcopy(model))


# ----------------------------------------------------------------------------- deployment metadata

def deployment_metadata(cfg, adapter) -> dict:
    """What a deployer needs besides the weights, from the pipeline and its adapter: the pipeline it
    came from (name, adapter, architecture, weights, the resolved configuration), the preprocessing
    and the class names (``None`` where the adapter does not know them)."""
    import yaml

    m = cfg.model
    return {
        "pipeline": {"name": cfg.name, "adapter": m.adapter, "arch": m.arch, "weights": m.weights,
                     "checkpoint": m.checkpoint, "objective": cfg.quantize.objective,
                     "config": yaml.safe_load(cfg.to_yaml())},
        "preprocessing": adapter.preprocessing(),
        "class_names": adapter.class_names(),
    }


def example_input(metadata: dict, input_size: tuple[int, ...] | None = None, batch: int = 1) -> Tensor:
    """A seeded ``(batch, C, H, W)`` input for tracing exporters: ``input_size`` (C, H, W) or the
    file's recorded preprocessing ``input_size``."""
    if input_size is None:
        input_size = ((metadata or {}).get("preprocessing") or {}).get("input_size")
    if input_size is None:
        raise ValueError("the file records no preprocessing input_size; pass --input-size C H W")
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input size must be C H W (three positive integers), got {list(size)}")
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def _metadata_strings(header: dict) -> dict[str, str]:
    """The file's architecture, plan and metadata as JSON strings (safetensors / ONNX metadata)."""
    out = {"format": "bgd-dense", "producer": str(header.get("producer")),
           "arch": json.dumps(header["arch"], sort_keys=True),
           "metadata": json.dumps(header.get("metadata", {}), sort_keys=True)}
    if "plan" in header:
        out["plan"] = json.dumps(header["plan"], sort_keys=True)
    return out


# ----------------------------------------------------------------------------- writers

def save_dense(path: str | Path, model: nn.Module) -> None:
    """The dense model's ``state_dict`` (``torch.save``), written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in _dense_checked(model).state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


def save_torchscript(path: str | Path, model: nn.Module, metadata: dict | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the dense model (eval mode), with ``bgd.json`` as an extra file."""
    scripted = torch.jit.script(_dense_checked(model).eval())
    extra = {"bgd.json": json.dumps(metadata or {}, sort_keys=True)}
    atomic_write(path, lambda f: torch.jit.save(scripted, f, _extra_files=extra))
    return scripted


def save_safetensors(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """The dense ``state_dict`` as safetensors; ``metadata`` (str -> str) goes into its header."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in _dense_checked(model).state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def save_onnx(path: str | Path, model: nn.Module, example: Tensor, metadata: dict[str, str] | None = None,
              opset: int | None = None) -> None:
    """ONNX via ``torch.onnx.export`` (the torch.export-based exporter), one self-contained file with a
    dynamic batch dimension; input ``input``, output ``output``; ``metadata`` as ``metadata_props``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx extra (pip install 'bgd-dist[onnx]'): {e}") from None
    dense = _dense_checked(model).eval()
    program = torch.onnx.export(dense, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(path, proto.SerializeToString())


def _dense_checked(model: nn.Module) -> nn.Module:
    left = sorted(pq_layers(model))
    if left:
        raise ValueError(f"the model still has quantized layers {left[:4]}{' ...' if len(left) > 4 else ''}; "
                         f"convert it with to_dense() first")
    return model


def export_file(src: str | Path, fmt: str, out: str | Path, input_size: tuple[int, ...] | None = None,
                opset: int | None = None) -> Path:
    """Export the ``.bgd`` file ``src`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`)."""
    from .fileformat import load_compressed, read_header

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    src, out = Path(src), Path(out)
    header = read_header(src)
    dense = load_compressed(src, dense=True)
    metadata = header.get("metadata", {})
    if fmt == "dense":
        save_dense(out, dense)
    elif fmt == "torchscript":
        save_torchscript(out, dense, {"arch": header["arch"], "metadata": metadata})
    elif fmt == "safetensors":
        save_safetensors(out, dense, _metadata_strings(header))
    else:
        if (metadata.get("preprocessing") or {}).get("applied_by_the_model"):
            raise ValueError(f"{src}: the ONNX export takes models whose input is one (N, C, H, W) image batch "
                             f"(classifiers); this model takes a list of images (detection): export it with "
                             f"--format torchscript")
        try:
            example = example_input(metadata, input_size)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        save_onnx(out, dense, example, _metadata_strings(header), opset)
    return out


def load_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The architecture and metadata recorded in an exported safetensors file (decoded JSON)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) if k in ("arch", "metadata", "plan") else v for k, v in meta.items()}
