"""``losses.png`` of a run directory, drawn from its ``log.jsonl`` alone.

Three panels: the layer-wise distillation loss of every stage, the global
distillation loss, and each layer's objective after its codebook fit relative to
the start of the fit. Written at the end of a run and refreshed at checkpoints
(at most every ``min_interval_s``, 2 minutes by default). matplotlib (Agg backend) is imported lazily.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from .io import atomic_write_bytes

log = logging.getLogger("bgd.plots")


def read_events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a kill
            continue
    return events


def loss_curves(events: list[dict]) -> dict:
    """``{("layerwise", stage) | ("global", None): [(step, loss), ...]}``, the last record of each
    step (a resumed phase logs steps again)."""
    curves: dict = {}
    for e in events:
        if e.get("event") == "loss":
            curves.setdefault((e["phase"], e.get("stage")), {})[e["step"]] = e["loss"]
    return {k: sorted(v.items()) for k, v in curves.items()}


def write_losses_png(run_dir: str | Path, events: list[dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    events = read_events(run_dir) if events is None else events
    curves = loss_curves(events)
    layers = {}
    for e in events:
        if e.get("event") == "layer":
            layers[e["layer"]] = e
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    stages = sorted(s for p, s in curves if p == "layerwise")
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(stages):
        steps, losses = zip(*curves[("layerwise", s)])
        ax.plot(steps, losses, color=cmap(i / max(len(stages) - 1, 1)), label=f"stage {s}" if len(stages) <= 8 else None)
    ax.set(title="layer-wise distillation (per stage)", xlabel="step", ylabel="loss")
    if stages and len(stages) <= 8:
        ax.legend(fontsize=7)
    ax = axes[1]
    if ("global", None) in curves:
        steps, losses = zip(*curves[("global", None)])
        ax.plot(steps, losses, color="C3")
    ax.set(title="global distillation", xlabel="step", ylabel="loss")
    ax = axes[2]
    names = list(layers)
    ratios = [layers[n]["objective_end"] / layers[n]["objective_start"] if layers[n]["objective_start"] else 1.0
              for n in names]
    ax.bar(range(len(names)), ratios, color="C0")
    ax.set(title="codebook fit: objective end / start per layer", xlabel="layer (in stage order)", ylabel="ratio")
    if 0 < len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path = run_dir / "losses.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


class LossPlot:
    """Refresh ``losses.png`` at most every ``min_interval_s`` (or when forced); a plot that
    fails is logged, never fatal."""

    def __init__(self, run_dir: str | Path, min_interval_s: float = 120.0):
        self.run_dir = Path(run_dir)
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        try:
            write_losses_png(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must not fail a run
            log.warning("could not write %s: %s", self.run_dir / "losses.png", e)
