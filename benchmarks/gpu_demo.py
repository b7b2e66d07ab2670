"""The demo pipeline (Mask R-CNN on shapes, the full pipeline on Ray) with its two stats actors on the
GPU (``num_gpus_per_worker=0.5``: they share one device), next to the CPU figures the README quotes
for ``bgd demo``: phase times, and box/mask AP (which must be within 0.01 of the CPU run).

    python benchmarks/gpu_demo.py [--out runs/gpu_demo] [--gpus-per-worker 0.5]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.01


def readme_demo_figures(readme: Path = ROOT / "README.md") -> tuple[dict, dict]:
    """The CPU run's student row (box/mask AP) and wall times from the README's demo block."""
    text = readme.read_text()
    block = text[text.index("**The demo**"):]
    row = re.search(r"^student\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)", block, re.M)
    times = re.search(r"^wall time \(s\): (.*)$", block, re.M)
    ap = {"box_AP": float(row.group(3)), "mask_AP": float(row.group(4))}
    seconds = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in times.group(1).split(", "))}
    return ap, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_demo")
    p.add_argument("--gpus-per-worker", type=float, default=0.5)
    args = p.parse_args(argv)
    import detection.demo as demo

    base = demo.demo_config

    def on_gpu(out, quick, executor="ray", extra=()):
        return base(out, quick, executor, [*extra, f"executor.num_gpus_per_worker={args.gpus_per_worker}"])

    demo.demo_config = on_gpu
    report = demo.run_demo(args.out, quick=False, executor="ray", progress=False)
    print(demo.format_table(report))
    cpu_ap, cpu_seconds = readme_demo_figures()
    secs = report["seconds"]
    print("phase          gpu (s)   cpu, README (s)")
    for k, v in secs.items():
        print(f"{k:<14} {v:>7.1f}   {cpu_seconds.get(k, float('nan')):>7.1f}")
    ok = True
    for k, ref in cpu_ap.items():
        got = report["student"][k]
        close = abs(got - ref) <= TOLERANCE
        ok &= close
        print(f"student {k}: gpu {got:.4f} vs cpu {ref:.4f} (|diff| {abs(got - ref):.4f}, "
              f"within {TOLERANCE}: {'ok' if close else 'NO'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
