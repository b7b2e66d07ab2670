"""``bgd status RUN_DIR``: where a run is, from its files alone.

Reads ``plan.json`` (the stages), ``manifest.json`` (the finished stages),
``log.jsonl`` (the distillation losses every checkpoint, restarts, layer sizes)
and ``report.json`` (a finished run). Works on a running, killed or finished run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .plots import read_events
from .runlock import lock_holder


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    now = time.time() if now is None else now
    events = read_events(run_dir)
    plan = _read_json(run_dir / "plan.json")
    manifest = _read_json(run_dir / "manifest.json") or {}
    report = _read_json(run_dir / "report.json")
    if not events and plan is None:
        raise ValueError(f"{run_dir}: not a run directory (no log.jsonl or plan.json)")
    n_stages = len(plan["stages"]) if plan else None
    done = sorted(int(k) for k, v in manifest.get("stages", {}).items() if v.get("status") == "done")
    holder = lock_holder(run_dir)
    state = "finished" if report else "in progress" if holder is not None else "stopped"
    st: dict = {"run_dir": str(run_dir), "name": None, "state": state, "pid": holder,
                "n_stages": n_stages, "stages_done": len(done), "stage": None, "phase": None, "step": None,
                "total": None, "loss": None, "steps_per_s": None, "phase_eta_s": None, "eta_s": None,
                "elapsed_s": None, "size_mb_so_far": None, "restarts": 0, "last_update_s": None}
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            if line.startswith("name:"):
                st["name"] = line.split(":", 1)[1].strip().strip("'\"")
                break
    if events:
        st["elapsed_s"] = (events[-1]["time"] if report or state == "stopped" else now) - events[0]["time"]
        st["last_update_s"] = now - events[-1]["time"]
    open_phase = None
    stage_times = []
    for e in events:
        kind = e.get("event")
        if kind == "layer" and e.get("quantized_mb_so_far") is not None:
            st["size_mb_so_far"] = e["quantized_mb_so_far"]
        elif kind == "restart":
            st["restarts"] += 1
        elif kind == "phase_start":
            open_phase = {"phase": e["phase"], "stage": e.get("stage"), "step": e.get("start_step", 0),
                          "total": e["total"], "loss": None, "steps_per_s": None, "eta_s": None}
        elif kind == "loss" and open_phase is not None:
            open_phase.update(step=e["step"], loss=e["loss"], steps_per_s=e.get("steps_per_s"), eta_s=e.get("eta_s"))
        elif kind == "phase_end":
            last_phase = open_phase
            open_phase = None
            if last_phase is not None and report is None:
                st.update(phase=f"{last_phase['phase']} done", loss=e.get("loss_end"))
        elif kind == "stage":
            stage_times.append(e["time"])
    if report:
        st.update(phase="finished", stage=n_stages, eta_s=0.0, size_mb_so_far=report.get("compressed_mb"))
        st["compressed_mb"] = report.get("compressed_mb")
        st["metrics_after"] = report.get("metrics_after")
        return st
    if open_phase is not None:
        st.update(phase=open_phase["phase"], step=open_phase["step"], total=open_phase["total"],
                  loss=open_phase["loss"], steps_per_s=open_phase["steps_per_s"], phase_eta_s=open_phase["eta_s"])
        if open_phase["phase"] == "layerwise":
            st["stage"] = open_phase["stage"] + 1
    elif n_stages is not None and len(done) < n_stages and st["phase"] is None:
        st["phase"] = "collect / fit"
    if st["stage"] is None and n_stages is not None:
        st["stage"] = min(len(done) + 1, n_stages) if len(done) < n_stages else n_stages
        if len(done) == n_stages and open_phase is None and st["phase"] in (None, "collect / fit"):
            st["phase"] = "global / export"
    if n_stages and len(stage_times) >= 2 and len(done) < n_stages:
        per_stage = (stage_times[-1] - stage_times[0]) / (len(stage_times) - 1)
        st["eta_s"] = per_stage * (n_stages - len(done)) + (st["phase_eta_s"] or 0.0)
        st["eta_note"] = "stages left x mean stage time; the global phase is not included until it starts"
    elif st["phase"] == "global":
        st["eta_s"] = st["phase_eta_s"]
    return st


def _hms(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, r = divmod(seconds, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_status(st: dict) -> str:
    lines = [f"{st['name'] or st['run_dir']}: {st['state']}"
             + (f" (PID {st['pid']})" if st.get("pid") and st["state"] == "in progress" else "")
             + (f" (last update {_hms(st['last_update_s'])} ago)" if st["state"] != "finished"
                and st["last_update_s"] is not None else "")]
    if st["state"] == "stopped":
        lines.append("  no process holds the run directory: it was interrupted; continue it with the same "
                     "command and --resume")
    if st["n_stages"] is not None:
        lines.append(f"  stages   {st['stages_done']}/{st['n_stages']} done"
                     + (f", at stage {st['stage']}/{st['n_stages']}" if st["state"] != "finished" else ""))
    phase = st["phase"] or "-"
    if st["step"] is not None:
        phase += f", step {st['step']}/{st['total']}"
        if st["loss"] is not None:
            phase += f", loss {st['loss']:.4f}"
        if st["steps_per_s"]:
            phase += f", {st['steps_per_s']:.1f} steps/s, phase ETA {_hms(st['phase_eta_s'])}"
    lines.append(f"  phase    {phase}")
    lines.append(f"  elapsed  {_hms(st['elapsed_s'])}" + (f", ETA {_hms(st['eta_s'])}" if st["eta_s"] is not None
                                                           and st["state"] != "finished" else ""))
    if st["size_mb_so_far"] is not None:
        lines.append(f"  size     {st['size_mb_so_far']:.3f} MB "
                     + ("(compressed)" if st["state"] == "finished" else "quantized so far"))
    lines.append(f"  restarts {st['restarts']}")
    if st.get("metrics_after"):
        lines.append("  after    " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in st["metrics_after"].items()))
    return "\n".join(lines)
