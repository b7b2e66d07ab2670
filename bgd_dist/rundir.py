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


def fingerprinted_config(cfg: PipelineConfig) -> dict:
    """The resolved config as the fingerprint sees it (only the number of shards of the executor)."""
    conf = yaml.safe_load(cfg.to_yaml())
    conf["executor"] = {"num_workers": cfg.executor.num_workers}  # shards matter, the rest does not
    conf["quantize"].pop("keep_stats", None)                      # what is kept for inspection does not
    return conf


def run_fingerprint(cfg: PipelineConfig, teacher: torch.nn.Module, adapter) -> dict:
    """What must be equal for ``--resume`` to continue a run: model, data and config."""
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": tensor_digest(teacher.state_dict()), "data": digest(adapter.data_fingerprint()),
            "config": digest(fingerprinted_config(cfg))}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return {prefix: obj}
    out = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """``["quantize.rules.1.block_size: 4 -> 2", ...]``: the settings that differ."""
    a, b = _flatten(old), _flatten(new)
    unset = object()
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, unset) != b.get(k, unset)]


class Manifest:
    """``manifest.json``: format version, fingerprint (and the resolved config it was taken of),
    the sha256 of ``plan.json``, and the stages durably written with the sha256 of their files.

    It is written when a run starts, before any other file, so every later file of the
    directory is covered by the fingerprint check of ``--resume``."""

    def __init__(self, path: Path, fingerprint: dict, config: dict | None = None):
        self.path = path
        self.data = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "config": config, "plan": None,
                     "stages": {}}

    @property
    def out(self) -> Path:
        return self.path.parent

    @classmethod
    def open(cls, path: Path, fingerprint: dict, resume: bool, config: dict | None = None) -> "Manifest":
        m = cls(path, fingerprint, config)
        if path.exists():
            if not resume:
                raise FileExistsError(f"{path.parent} already holds a run; pass --resume to continue it "
                                      f"or choose another --out directory")
            old = read_manifest(path)
            if old.get("version") != MANIFEST_VERSION:
                raise ValueError(f"{path}: manifest version {old.get('version')} is not supported")
            diff = [k for k in fingerprint if old["fingerprint"].get(k) != fingerprint[k]]
            if diff:
                detail = ""
                if "config" in diff and isinstance(old.get("config"), dict) and config is not None:
                    changes = config_differences(old["config"], config)
                    detail = f" (changed: {'; '.join(changes[:8])}{'; ...' if len(changes) > 8 else ''})"
                raise ValueError(f"{path}: cannot resume: the {', '.join(diff)} differ(s) from the run "
                                 f"recorded there{detail}; use a new --out directory")
            m.data = {"config": config, "plan": None, **old}
        elif resume and ((path.parent / "plan.json").exists() or (path.parent / "stages").exists()):
            raise ValueError(f"{path}: missing, but {path.parent} holds files of a run (plan.json, stages/); "
                             f"they cannot be checked against this run; use a new --out directory")
        m.save()
        return m

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    # -- the plan -----------------------------------------------------------------------------------
    def record_plan(self, plan_path: Path) -> None:
        self.data["plan"] = file_sha256(plan_path)
        self.save()

    def plan_problem(self, plan_path: Path) -> str | None:
        """Why ``plan.json`` cannot be reused (None: it can)."""
        if not plan_path.exists():
            return f"{plan_path} is missing"
        if self.data.get("plan") is None:
            return f"{plan_path} was not recorded in {self.path.name} (the run stopped while writing it)"
        if file_sha256(plan_path) != self.data["plan"]:
            return f"{plan_path} differs from the plan recorded in {self.path.name} (damaged or replaced)"
        return None

    # -- stages -------------------------------------------------------------------------------------
    def done(self, stage: int) -> bool:
        return self.data["stages"].get(str(stage), {}).get("status") == "done"

    def mark(self, stage: int, files: list[Path], **info) -> None:
        """Stage ``stage`` is durably written: its ``files`` (with their sha256) and ``info``."""
        self.data["stages"][str(stage)] = {"status": "done", "files": {str(f.relative_to(self.out)): file_sha256(f)
                                                                       for f in files}, **info}
        self.save()

    def stage_problem(self, stage: int) -> str | None:
        """Why a finished stage's files cannot be replayed (None: they can)."""
        files = self.data["stages"].get(str(stage), {}).get("files", {})
        for rel, sha in (files.items() if isinstance(files, dict) else ()):
            f = self.out / rel
            if not f.exists():
                return f"{f} is missing"
            if file_sha256(f) != sha:
                return f"{f} does not match its checksum in {self.path.name} (damaged, or a file of another run)"
        return None


def read_manifest(path: Path) -> dict:
    """The manifest's content; a damaged file is an error naming it."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: damaged ({e}); without it the stage files cannot be checked: use a new --out "
                         f"directory (or remove {path.parent} to start this one over)") from None
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), dict) \
            or not isinstance(data.get("stages"), dict):
        raise ValueError(f"{path}: not a run manifest (no fingerprint or stages); use a new --out directory")
    return data


# -- stage files ------------------------------------------------------------------------------------
#: the key prefix of the other tensors a stage changed (bias correction), stored next to its codebooks
CORRECTED = "corrected:"


def save_stage(path: Path, student: torch.nn.Module, names: list[str], params: tuple[str, ...] | list[str] = (),
               tensors: list[str] | tuple = ()) -> None:
    """``stages/<k>/codebooks.pt``: the fine-tuned centroids and the assignments of a stage's layers;
    under ``"params"`` the other parameters its distillation trained (BN affine, biases; only when
    there are any); and the current value of the student's ``tensors`` (parameters or buffers by
    dotted name, e.g. the biases bias correction changed), which :func:`corrected_from` gives back."""
    layers = pq_layers(student)
    obj = {}
    for n in names:
        obj[f"{n}.centroids"] = layers[n].centroids.detach().cpu().clone()
        obj[f"{n}.assignments"] = layers[n].assignments.detach().cpu().clone()
    if params:
        own = dict(student.named_parameters())
        obj["params"] = {n: own[n].detach().cpu().clone() for n in params}
    state = student.state_dict()
    for t in tensors:
        obj[f"{CORRECTED}{t}"] = state[t].detach().cpu().clone()
    atomic_write(path, lambda f: torch.save(obj, f))


def corrected_from(obj: dict) -> dict:
    """``{dotted name: tensor}``: the other tensors a loaded stage file holds (see :func:`save_stage`)."""
    return {k[len(CORRECTED):]: v for k, v in obj.items() if k.startswith(CORRECTED)}


def load_stage(path: Path, names: list[str]) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a stage file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a stage file")
    missing = [n for n in names if f"{n}.centroids" not in obj]
    if missing:
        raise ValueError(f"{path}: stage file lacks layers {missing}")
    return obj


def codebooks_from(obj: dict, names: list[str]) -> dict:
    """The :class:`~bgd_dist.core.kmeans.Codebook` of each layer of a loaded stage file."""
    from .core.kmeans import Codebook

    return {n: Codebook(obj[f"{n}.centroids"], obj[f"{n}.assignments"], ()) for n in names}


def save_stage_stats(path: Path, stats: dict, keep: str = "full") -> int:
    """``stages/<k>/stats.pt``: the merged statistics a stage was fitted with, for inspection (a
    resumed run never reads them: a finished stage replays its codebooks, an unfinished one collects
    again). ``keep``: ``full`` as collected; ``pooled``: a full ``L x L`` Hessian reduced to the
    paper's ``d x d`` Gram of the same inputs (the sum of its diagonal blocks; other kinds as they
    are), which is what makes a Hessian run's directory as small as a paper run's; ``none``: no file.
    Returns the bytes written."""
    path = Path(path)
    if keep == "none":
        path.unlink(missing_ok=True)
        return 0
    if keep == "pooled":
        stats = {n: st.pooled() if hasattr(st, "pooled") else st for n, st in stats.items()}
    atomic_write(path, lambda f: torch.save({n: st.state() for n, st in stats.items()}, f))
    return path.stat().st_size


def directory_bytes(path: Path) -> int:
    """The bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def load_stage_stats(path: Path) -> dict:
    """The merged statistics a finished stage was fitted with (``stages/<k>/stats.pt``)."""
    from .core.stats import stats_from_state

    return {n: stats_from_state(st) for n, st in torch.load(path, map_location="cpu", weights_only=True).items()}
