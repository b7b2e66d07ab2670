"""The files of a run directory that make ``--resume`` possible: the JSON-lines log, the
fingerprint of what a run depends on, the manifest of finished stages, the stage files."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import yaml

from .config import PipelineConfig
from .io import atomic_write, atomic_write_text
from .nn.modules import pq_layers

MANIFEST_VERSION = 1


class JsonlLog:
    """``log.jsonl``: one JSON record per event, appended."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, **fields) -> None:
        record = {"time": time.time(), "event": event, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def tensor_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_fingerprint(cfg: PipelineConfig, teacher: torch.nn.Module, adapter) -> dict:
    """What must be equal for ``--resume`` to continue a run: model, data and config."""
    conf = yaml.safe_load(cfg.to_yaml())
    conf["executor"] = {"num_workers": cfg.executor.num_workers}  # shards matter, the rest does not
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": tensor_digest(teacher.state_dict()), "data": digest(adapter.data_fingerprint()),
            "config": digest(conf)}


class Manifest:
    """``manifest.json``: format version, fingerprint, and the stages durably written."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.data = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "stages": {}}

    @classmethod
    def open(cls, path: Path, fingerprint: dict, resume: bool) -> "Manifest":
        m = cls(path, fingerprint)
        if path.exists():
            if not resume:
                raise FileExistsError(f"{path.parent} already holds a run; pass --resume to continue it "
                                      f"or choose another --out directory")
            old = json.loads(path.read_text())
            if old.get("version") != MANIFEST_VERSION:
                raise ValueError(f"{path}: manifest version {old.get('version')} is not supported")
            diff = [k for k in fingerprint if old["fingerprint"].get(k) != fingerprint[k]]
            if diff:
                raise ValueError(f"{path}: cannot resume: the {', '.join(diff)} differ(s) from the run "
                                 f"recorded there; use a new --out directory")
            m.data = old
        return m

    def done(self, stage: int) -> bool:
        return self.data["stages"].get(str(stage), {}).get("status") == "done"

    def mark(self, stage: int, **info) -> None:
        self.data["stages"][str(stage)] = {"status": "done", **info}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


# -- stage files ------------------------------------------------------------------------------------
def save_stage(path: Path, student: torch.nn.Module, names: list[str]) -> None:
    """``stages/<k>/codebooks.pt``: the fine-tuned centroids and the assignments of a stage's layers."""
    layers = pq_layers(student)
    obj = {}
    for n in names:
        obj[f"{n}.centroids"] = layers[n].centroids.detach().cpu().clone()
        obj[f"{n}.assignments"] = layers[n].assignments.detach().cpu().clone()
    atomic_write(path, lambda f: torch.save(obj, f))


def load_stage(path: Path, names: list[str]) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    missing = [n for n in names if f"{n}.centroids" not in obj]
    if missing:
        raise ValueError(f"{path}: stage file lacks layers {missing}")
    return obj


def codebooks_from(obj: dict, names: list[str]) -> dict:
    """The :class:`~bgd_dist.core.kmeans.Codebook` of each layer of a loaded stage file."""
    from .core.kmeans import Codebook

    return {n: Codebook(obj[f"{n}.centroids"], obj[f"{n}.assignments"], ()) for n in names}


def save_stage_stats(path: Path, stats: dict) -> None:
    """``stages/<k>/stats.pt``: the merged statistics a stage was fitted with."""
    atomic_write(path, lambda f: torch.save({n: st.state() for n, st in stats.items()}, f))


def load_stage_stats(path: Path) -> dict:
    """The merged statistics a finished stage was fitted with (``stages/<k>/stats.pt``)."""
    from .core.stats import stats_from_state

    return {n: stats_from_state(st) for n, st in torch.load(path, map_location="cpu", weights_only=True).items()}
