"""Cost of one distillation step of a fully quantized ResNet-50 against the same step of the dense model.

The student is torchvision's ResNet-50 (``weights=None``) with every conv and
linear layer but the 7x7 stem replaced by its quantized module (3x3: d = 9;
1x1 and fc: d = 4; ``K = 256`` clamped as a plan does; seeded random codebooks:
the cost of a step does not depend on the centroids' values). The dense model is
the same network unquantized; the teacher is a dense copy.

A step is what :func:`bgd_dist.finetune.distill` does once: teacher forward
(no grad), student forward, KL loss, backward, SGD step, on one batch of
``--batch`` (32) images of ``--size`` (224) pixels. Two kinds:

- ``layerwise``: student in eval mode, one layer trains (``--layer``; its
  centroids, resp. its dense weight): the quantized student still decodes every
  layer in the forward;
- ``global``: student in train mode (BN statistics update), every quantized
  layer trains (all centroids, resp. all conv/linear weights).

Quantized and dense steps alternate in the same process; the figure is the
median of ``--steps`` timed steps per side after one warm-up step, and the ratio
``quantized / dense``. The teacher's share of a layer-wise step is also timed
(its forward alone, and a step that reuses a stored teacher output): the teacher
never changes during a run, so the distillation batches' teacher outputs could be
computed once and reused by all layer-wise phases; the saving is printed.

On CUDA (when a device is present and ``--device cuda``) the forwards run under
bf16 autocast.

Usage::

    python -m benchmarks.distill_step                       # batch 32, 224 px: a few minutes on 2 cores
    python -m benchmarks.distill_step --batch 8 --size 160  # smoke run
    python -m benchmarks.distill_step --decode-only         # what decoding adds to every student forward
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bgd_dist.core.kmeans import Codebook, clamp_n_centroids
from bgd_dist.core.layouts import geometry_of
from bgd_dist.nn.modules import get_submodule, pq_layers, quantized_from_dense, set_submodule

TARGET_RATIO = 1.15


def kl_loss(student_logits, teacher_logits):
    """The classification adapter's distillation loss (KL of the softmaxes, batch mean)."""
    return F.kl_div(F.log_softmax(student_logits.float(), 1), F.softmax(teacher_logits.float(), 1),
                    reduction="batchmean")


def quantize_all(model: nn.Module, n_centroids: int = 256, seed: int = 0) -> nn.Module:
    """Every conv/linear layer but the stem replaced by a quantized one with a random codebook."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv1"]
    for name in names:
        module = get_submodule(model, name)
        geometry = geometry_of(module)
        d = 9 if geometry.kernel_size == (3, 3) else 4
        n_sub = geometry.n_subvectors(d, name)
        k = clamp_n_centroids(n_centroids, n_sub)
        std = float(module.weight.detach().std())
        codebook = Codebook(torch.randn(k, d, generator=gen) * std, torch.randint(k, (n_sub,), generator=gen),
                            (0.0,))
        set_submodule(model, name, quantized_from_dense(module, codebook, name))
    return model


def trainable(model: nn.Module, layer: str | None) -> list[nn.Parameter]:
    """The parameters a step trains: centroids of the quantized layers (or dense weights), one layer or all."""
    pq = pq_layers(model)
    if pq:
        return [pq[layer].centroids] if layer else [m.centroids for m in pq.values()]
    if layer:
        return [get_submodule(model, layer).weight]
    return [m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv1"]


class Stepper:
    """One model's distillation step (as :func:`bgd_dist.finetune.distill` runs it)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layer: str | None, train_mode: bool, autocast):
        self.student, self.teacher, self.autocast = student, teacher, autocast
        for p in student.parameters():
            p.requires_grad_(False)
        self.params = trainable(student, layer)
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        student.train(train_mode)
        teacher.eval()

    def teacher_out(self, images):
        with torch.no_grad(), self.autocast():
            return self.teacher(images)

    def __call__(self, images, target=None) -> float:
        if target is None:
            target = self.teacher_out(images)
        with self.autocast():
            out = self.student(images)
        loss = kl_loss(out, target)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        return loss.item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def decode_cost(model: nn.Module, device, repeats: int = 3) -> dict:
    """Time of decoding every quantized layer's weight once (what each forward of the student adds)."""
    layers = pq_layers(model)
    n = sum(m.assignments.numel() * m.block_size for m in layers.values())

    def decode_all():
        with torch.no_grad():
            for m in layers.values():
                m.weight

    times = [timed(decode_all, device) for _ in range(repeats)]
    t = statistics.median(times)
    print(f"distill_step decode of all {len(layers)} quantized layers ({n / 1e6:.1f}M weights, {device}, "
          f"{torch.get_num_threads()} threads): {t:.2f} s per forward (median of {repeats})", flush=True)
    return {"decode_s": t, "n_layers": len(layers), "n_weights": n}


def main(args: argparse.Namespace) -> dict:
    from torchvision.models import resnet50

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    torch.manual_seed(args.seed)
    dense = resnet50(weights=None).to(device)
    teacher = copy.deepcopy(dense)
    quant = quantize_all(copy.deepcopy(dense).cpu(), seed=args.seed).to(device)
    if args.decode_only:
        return decode_cost(quant, device)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
               for _ in range(args.steps + 1)]
    report = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
              "steps": args.steps}
    for kind, layer, train_mode in (("layerwise", args.layer, False), ("global", None, True)):
        sides = {"quantized": Stepper(quant, teacher, layer, train_mode, autocast),
                 "dense": Stepper(dense, teacher, layer, train_mode, autocast)}
        times = {s: [] for s in sides}
        teacher_times, cached_times = [], []
        for i, images in enumerate(batches):
            for name, step in sides.items():
                t = timed(lambda: step(images), device)
                if i:
                    times[name].append(t)
            if kind == "layerwise":
                q = sides["quantized"]
                target = q.teacher_out(images)
                t_teacher = timed(lambda: q.teacher_out(images), device)
                t_cached = timed(lambda: q(images, target), device)
                if i:
                    teacher_times.append(t_teacher)
                    cached_times.append(t_cached)
        med = {s: statistics.median(v) for s, v in times.items()}
        ratio = med["quantized"] / med["dense"]
        entry = {"quantized_s": med["quantized"], "dense_s": med["dense"], "ratio": ratio,
                 "ok": ratio <= TARGET_RATIO}
        line = (f"distill_step {kind} ({'layer ' + layer if layer else 'all layers'}, batch {args.batch}, "
                f"{args.size}px, {device}, {torch.get_num_threads()} threads): quantized {med['quantized']:.2f} s "
                f"dense {med['dense']:.2f} s ratio {ratio:.3f} (target <= {TARGET_RATIO}: "
                f"{'ok' if entry['ok'] else 'MISSED'})")
        if kind == "layerwise":
            t_teacher, t_cached = statistics.median(teacher_times), statistics.median(cached_times)
            entry |= {"teacher_forward_s": t_teacher, "quantized_cached_teacher_s": t_cached,
                      "teacher_share": t_teacher / med["quantized"]}
            line += (f"; teacher forward {t_teacher:.2f} s = {100 * t_teacher / med['quantized']:.0f}% of the "
                     f"quantized step, step with a stored teacher output {t_cached:.2f} s")
        report[kind] = entry
        print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Quantized vs dense distillation step of ResNet-50.")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after one warm-up)")
    p.add_argument("--layer", default="layer1.0.conv2", help="the layer a layer-wise step trains")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-only", action="store_true", help="only time the decoding of the quantized layers")
    p.add_argument("--json", type=Path, default=None)
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
