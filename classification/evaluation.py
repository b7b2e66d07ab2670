"""Top-k accuracy, mergeable across evaluation shards (detectron2-style evaluator + state/merge)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from bgd_dist.adapters import EvaluatorBase

log = logging.getLogger(__name__)


def topk_correct(logits: Tensor, labels: Tensor, topk: tuple[int, ...]) -> dict[int, int]:
    """``{k: number of rows whose label is among the k highest logits}``.

    logits: (N, C); labels: (N,) int. ``k`` larger than C counts every row.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                     # (N, kmax)
    hit = top == labels.unsqueeze(1)                            # (N, kmax)
    return {k: int(hit[:, :min(k, kmax)].any(1).sum()) for k in topk}


class TopKEvaluator(EvaluatorBase):
    """Top-1 / top-5 accuracy (percent) of a classifier.

    ``process(batch, outputs)``: ``batch`` is ``(images, labels)``, ``outputs``
    the logits (any device). ``state()`` is plain data; ``merge(states)`` adds
    other shards' counts, so shards evaluate in parallel and the driver scores
    once. Progress is logged every ``log_every`` images.
    """

    def __init__(self, topk: tuple[int, ...] = (1, 5), log_every: int = 5000):
        self.topk = tuple(topk)
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.correct = {k: 0 for k in self.topk}
        self.total = 0

    def process(self, batch, outputs: Tensor) -> None:
        labels = batch[1]
        labels = torch.as_tensor(labels).cpu().long()
        counts = topk_correct(outputs.detach().float().cpu(), labels, self.topk)
        before = self.total
        for k, n in counts.items():
            self.correct[k] += n
        self.total += len(labels)
        if self.log_every and self.total // self.log_every > before // self.log_every:
            log.info("evaluated %d images: %s", self.total, self._format())

    def state(self) -> dict:
        return {"correct": {str(k): v for k, v in self.correct.items()}, "total": self.total}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            for k in self.topk:
                self.correct[k] += int(s["correct"][str(k)])
            self.total += int(s["total"])

    def result(self) -> dict:
        out = {f"top{k}": 100.0 * self.correct[k] / max(self.total, 1) for k in self.topk}
        out["n_images"] = self.total
        return out

    def _format(self) -> str:
        return ", ".join(f"top{k} {100.0 * v / max(self.total, 1):.2f}" for k, v in self.correct.items())
