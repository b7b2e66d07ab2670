"""Train the demo's teacher: a small Mask R-CNN on the synthetic shapes, from scratch.

Reproduces ``detection/assets/shapes_maskrcnn.pt`` (see ``detection/assets/README.md``
for the exact command and the numbers it gave)::

    python -m detection.train_teacher --out detection/assets/shapes_maskrcnn.pt

The training images are the ``train`` stream of :mod:`detection.shapes` (images
``0 .. n_train-1`` of the seed; the demo's 400 training images are the first
400 of them), rendered in memory; the validation split is never seen. The
model is :func:`detection.models.build_small_maskrcnn` with ordinary
BatchNorm for training (``norm="bn"``), trained with the standard Mask R-CNN
losses; the saved state dict (fp16, without ``num_batches_tracked``) loads
into the frozen-BN model the pipelines use. Runs on a GPU when there is one
(minutes), otherwise on the CPU (hours). ``--max-minutes`` shortens the
schedule to fit a time budget, measured after a few iterations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from .models import bn_to_frozen_state, build_small_maskrcnn
from .shapes import render_image

log = logging.getLogger("bgd.train_teacher")


def _render(args):
    seed, index, size = args
    pixels, objects = render_image(seed, "train", index, size)
    masks = np.stack([o["mask"] for o in objects]).astype(np.uint8) if objects \
        else np.zeros((0, size, size), dtype=np.uint8)
    labels = np.array([o["category_id"] for o in objects], dtype=np.int64)
    return pixels, masks, labels


def render_train_set(n: int, size: int, seed: int, processes: int) -> list:
    jobs = [(seed, i, size) for i in range(n)]
    if processes > 1:
        with Pool(processes) as pool:
            return pool.map(_render, jobs, chunksize=32)
    return [_render(j) for j in jobs]


def make_target(masks: np.ndarray, labels: np.ndarray) -> dict:
    """Boxes from the visible masks (as the annotation files have them), xyxy."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks)}


def batch_of(samples: list, idx: list, flips: list, device) -> tuple[list, list]:
    images, targets = [], []
    for i, flip in zip(idx, flips):
        pixels, masks, labels = samples[i]
        img = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        t = make_target(masks, labels)
        if flip:
            w = img.shape[-1]
            img = img.flip(-1)
            b = t["boxes"]
            t["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
            t["masks"] = t["masks"].flip(-1)
        images.append(img.to(device))
        targets.append({k: v.to(device) for k, v in t.items()})
    return images, targets


def lr_at(it: int, total: int, base: float, warmup: int) -> float:
    if it < warmup:
        return base * (0.001 + 0.999 * it / warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


def evaluate_state(state: dict, model_kwargs: dict, n_val: int, size: int, seed: int, device) -> dict:
    """Box and mask AP of a frozen-BN model with ``state`` on the shapes val split (written to a temp dir)."""
    from .coco import CocoImages, category_mapping
    from .evaluation import COCOEvaluator
    from .shapes import make_shapes

    model = build_small_maskrcnn(**model_kwargs)
    model.load_state_dict(state)
    model.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shapes(tmp, 0, n_val, size, seed)
        images = CocoImages(paths["val_images"], paths["val_annotations"])
        evaluator = COCOEvaluator(paths["val_annotations"], category_mapping(paths["val_annotations"],
                                                                             model_kwargs.get("num_classes", 4)))
        with torch.no_grad():
            for start in range(0, len(images), 8):
                idx = list(range(start, min(start + 8, len(images))))
                outputs = model([images.load(i).to(device) for i in idx])
                evaluator.process({"image_ids": [images.image_id(i) for i in idx]},
                                  [{k: v.cpu() for k, v in o.items()} for o in outputs])
        return evaluator.result()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    samples = render_train_set(args.n_train, args.size, args.data_seed, args.processes)
    log.info("rendered %d training images in %.1fs", len(samples), time.perf_counter() - t0)
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = build_small_maskrcnn(norm="bn", **model_kwargs).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    total = args.iters
    start = time.perf_counter()
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    history = []
    it = 0
    while it < total:
        if it == 30 and deadline is not None:
            per_it = (time.perf_counter() - start) / 30
            fit = int((deadline - start) / per_it)
            if fit < total:
                log.info("%.3fs per iteration: %d iterations fit in %.1f minutes (of %d)", per_it, fit,
                         args.max_minutes, total)
                total = max(fit, 31)
        for group in opt.param_groups:
            group["lr"] = lr_at(it, total, args.lr, args.warmup)
        idx = torch.randint(len(samples), (args.batch_size,), generator=gen).tolist()
        flips = (torch.rand(args.batch_size, generator=gen) < 0.5).tolist()
        images, targets = batch_of(samples, idx, flips, device)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {it}: {losses}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if it % args.log_every == 0 or it == total - 1:
            row = {"it": it, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
            history.append(row)
            log.info("it %d/%d loss %.4f (%s) lr %.5f %.0fs", it, total, row["loss"],
                     " ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("loss_")), row["lr"],
                     row["seconds"])
        it += 1
    state = bn_to_frozen_state({k: v.detach().cpu() for k, v in model.state_dict().items()})
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    report = {"checkpoint": str(out), "sha256": digest, "bytes": out.stat().st_size, "iterations": total,
              "train_seconds": time.perf_counter() - start, "args": vars(args), "history": history}
    if args.eval_val:
        try:
            report["val"] = evaluate_state({k: v.float() if v.is_floating_point() else v for k, v in half.items()},
                                           model_kwargs, args.eval_val, args.size, args.data_seed, device)
            log.info("val: box AP %.4f, mask AP %.4f", report["val"]["box_AP"], report["val"]["mask_AP"])
        except Exception as e:  # evaluation needs pycocotools; the checkpoint is saved regardless
            log.warning("evaluation failed: %s: %s", type(e).__name__, e)
            report["val_error"] = f"{type(e).__name__}: {e}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    log.info("wrote %s (%d bytes, sha256 %s)", out, report["bytes"], digest)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="detection/assets/shapes_maskrcnn.pt")
    p.add_argument("--n-train", type=int, default=4000, help="training images (the shapes train stream)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0, help="the shapes dataset seed (the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=1089, help="the committed teacher: 1089 (what fitted 5.8 minutes on an H200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--model-kwargs", default="", help="JSON keyword arguments of build_small_maskrcnn")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 1))))
    p.add_argument("--max-minutes", type=float, default=0.0, help="fit the schedule into this many minutes")
    p.add_argument("--eval-val", type=int, default=100, help="validation images to evaluate at the end (0: none)")
    p.add_argument("--log-every", type=int, default=100)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(get_args_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
