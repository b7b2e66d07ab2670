"""Which container for the compressed model: today's ``.bgd`` or safetensors?

For ResNet-18 and ResNet-50 quantized under the paper's small-blocks and
large-blocks plans (random codebooks: sizes and load times do not depend on
the values), writes

- ``bgd``: today's container (fp16 centroids, indexes bit-packed at
  ceil(log2 K) bits, JSON header, sha256 of header and payload);
- ``safetensors-codes``: the candidate: the same tensors in a safetensors file,
  indexes unpacked as uint8 (K <= 256) or int16 (K <= 65536, read as unsigned),
  architecture, plan, metadata and a sha256 of the tensor data as JSON strings
  in its metadata;
- ``safetensors-dense``: what ``bgd export --format safetensors`` writes (the
  decoded dense state dict), for scale;

and prints per file its size and the median time (``--repeats``) to load the
quantized model from it (``load_compressed`` for ``bgd``; ``safe_open`` +
the same assembly for the codes; ``load_file`` + ``load_state_dict`` for the
dense file).

    python -m benchmarks.container [--archs resnet18 resnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import yaml

from bgd_dist.config import QuantizeConfig, from_mapping
from bgd_dist.core.kmeans import Codebook
from bgd_dist.core.sizing import MB
from bgd_dist.export import save_safetensors, to_dense
from bgd_dist.fileformat import assemble, load_compressed, save_compressed
from bgd_dist.io import atomic_write_bytes
from bgd_dist.nn.modules import pq_layers, quantize_
from bgd_dist.plan import Plan, build_plan

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def random_compressed(arch: str, pipeline: str, seed: int = 0):
    raw = yaml.safe_load((PIPELINES / f"{pipeline}.yaml").read_text())
    q = from_mapping(QuantizeConfig, raw["quantize"], "quantize")
    gen = torch.Generator().manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    plan = build_plan(model, q.rules, run=lambda m: m(torch.zeros(1, 3, 64, 64)), default_n_centroids=q.n_centroids,
                      clamp=q.clamp)
    codebooks = {l.name: Codebook(0.05 * torch.randn(l.n_centroids, l.block_size, generator=gen),
                                  torch.randint(l.n_centroids, (l.n_subvectors,), generator=gen), ())
                 for l in plan.quantized}
    return quantize_(model, plan, codebooks), plan


def _digest(tensors: dict) -> str:
    """sha256 of the tensors' bytes in key order (safetensors keeps no checksum of its own)."""
    sha = hashlib.sha256()
    for key in sorted(tensors):
        sha.update(tensors[key].numpy().tobytes())
    return sha.hexdigest()


def save_codes_safetensors(path: Path, model, plan: Plan, arch: dict) -> None:
    """The candidate container: codes as small integer tensors, the rest at its dtype."""
    from safetensors.torch import save

    pq = pq_layers(model)
    tensors = {}
    for key, value in model.state_dict().items():
        layer, _, part = key.rpartition(".")
        if layer in pq and part == "centroids":
            value = value.half()
        elif layer in pq and part == "assignments":
            value = value.to(torch.uint8 if pq[layer].n_centroids <= 256 else torch.int16)  # int16: read unsigned
        tensors[key] = value.contiguous()
    digest = _digest(tensors)
    metadata = {"format": "bgd-model", "arch": json.dumps(arch), "plan": json.dumps(plan.to_dict()),
                "metadata": "{}", "sha256": digest}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_codes_safetensors(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    if _digest(state) != meta["sha256"]:
        raise ValueError(f"{path}: checksum mismatch")
    for key, value in state.items():
        if key.endswith(".assignments"):
            state[key] = value.to(torch.int64) & 0xFFFF
        elif key.endswith(".centroids"):
            state[key] = value.float()
    return assemble(path, json.loads(meta["arch"]), Plan.from_dict(json.loads(meta["plan"])), state)


def load_dense_safetensors(path: Path, arch: str):
    from safetensors.torch import load_file

    model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--pipelines", nargs="+", default=["small", "large"])
    p.add_argument("--repeats", type=int, default=5)
    return p


def main(args) -> list[dict]:
    rows = []
    print(f"{'model':<18} {'container':<18} {'bytes':>12} {'MB':>8} {'load s':>8}   (median of {args.repeats})")
    for arch in args.archs:
        for pipeline in args.pipelines:
            model, plan = random_compressed(arch, f"{arch}_{pipeline}")
            ref = {"factory": f"torchvision.models:{arch}", "kwargs": {}}
            x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            with tempfile.TemporaryDirectory() as tmp:
                files = {"bgd": Path(tmp) / "model.bgd", "safetensors-codes": Path(tmp) / "codes.safetensors",
                         "safetensors-dense": Path(tmp) / "dense.safetensors"}
                save_compressed(files["bgd"], model, plan, ref)
                save_codes_safetensors(files["safetensors-codes"], model, plan, ref)
                save_safetensors(files["safetensors-dense"], to_dense(load_compressed(files["bgd"])))
                loaders = {"bgd": lambda: load_compressed(files["bgd"]),
                           "safetensors-codes": lambda: load_codes_safetensors(files["safetensors-codes"]),
                           "safetensors-dense": lambda: load_dense_safetensors(files["safetensors-dense"], arch)}
                with torch.no_grad():
                    outs = {name: load()(x) for name, load in loaders.items()}
                assert all(torch.equal(o, outs["bgd"]) for o in outs.values()), "containers disagree"
                for name, load in loaders.items():
                    nbytes = files[name].stat().st_size
                    seconds = median_seconds(load, args.repeats)
                    label = f"{arch}_{pipeline}"
                    print(f"{label:<18} {name:<18} {nbytes:>12,} {nbytes / MB:>8.3f} {seconds:>8.3f}", flush=True)
                    rows.append({"model": label, "container": name, "bytes": nbytes, "load_s": seconds})
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
