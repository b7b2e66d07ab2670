"""One distillation step of a compressed ResNet-50 against its dense teacher, and the same step
training the dense network: steps/s with bf16 autocast off and on, and the student/dense ratio.

A step is what distillation does per batch: the teacher's forward pass (no gradient), the trained
model's forward and backward pass, and an SGD update (the student: its centroids; the dense
baseline: all weights). The student has the layers and sizes of ``pipelines/resnet50_small.yaml``
with random codebooks (the step time does not depend on the values).

    python benchmarks/gpu_distill_step.py                      # batch 64 on cuda if available
    python benchmarks/gpu_distill_step.py --batch 2 --steps 1 --image-size 64   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch

from bgd_dist.adapters import make_adapter, plan_for
from bgd_dist.config import load_pipeline
from bgd_dist.core.kmeans import Codebook
from bgd_dist.nn.modules import get_submodule, quantize_
from bgd_dist.student import centroid_parameters

ROOT = Path(__file__).resolve().parents[1]


def random_codebooks(plan, model, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in plan.quantized:
        name = layer.name
        n_sub = get_submodule(model, name).weight.numel() // layer.block_size
        centroids = torch.randn(layer.n_centroids, layer.block_size, generator=gen) * 0.02
        assignments = torch.randint(layer.n_centroids, (n_sub,), generator=gen)
        out[name] = Codebook(centroids, assignments, (0.0,))
    return out


def time_steps(model, teacher, params, batch, steps: int, amp: bool, device) -> float:
    """Seconds per step (median of ``steps`` after two warm-up steps)."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    def cast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with cast():
            with torch.no_grad():
                target = teacher(batch)
            out = model(batch)
            loss = torch.nn.functional.kl_div(out.float().log_softmax(1), target.float().log_softmax(1),
                                              log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(ROOT / "pipelines" / "resnet50_small.yaml"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_pipeline(args.pipeline, ["model.weights=null", f"data.example_size={args.image_size}"])
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model().eval()
    plan = plan_for(cfg, teacher, adapter)
    student = quantize_(copy.deepcopy(teacher), plan, random_codebooks(plan, teacher)).to(device).eval()
    dense = copy.deepcopy(teacher).to(device).eval()
    teacher = teacher.to(device)
    for m in (teacher, student, dense):
        for q in m.parameters():
            q.requires_grad_(False)
    student_params = list(centroid_parameters(student).values())
    dense_params = list(dense.parameters())
    for q in student_params + dense_params:
        q.requires_grad_(True)
    batch = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
                        ).to(device)
    print(f"distill step: ResNet-50, {len(plan.quantized)} quantized layers, batch {args.batch}, "
          f"{args.image_size}px, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    for amp in (False, True):
        s = time_steps(student, teacher, student_params, batch, args.steps, amp, device)
        d = time_steps(dense, teacher, dense_params, batch, args.steps, amp, device)
        print(f"bf16 autocast {'on ' if amp else 'off'}: student {1 / s:.2f} steps/s ({s * 1000:.1f} ms), "
              f"dense teacher {1 / d:.2f} steps/s ({d * 1000:.1f} ms), student/dense step time {s / d:.2f}")


if __name__ == "__main__":
    main()
