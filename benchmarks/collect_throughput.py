"""The data path of the statistics pass: images per second per worker, and the share of it spent
waiting for images (reading and decoding JPEGs, augmenting) rather than running the network.

A ResNet-50 (torchvision, random weights) on an ImageFolder of JPEG photographs written here
(random crops of scikit-learn's two sample photographs at ImageNet-like sizes, so decoding costs what
it costs on ImageNet), the classification adapter's real loading path (PIL decode,
RandomResizedCrop to 224, normalisation). For each setting of ``executor.threads_per_worker`` and
the adapter's ``data.num_workers`` (DataLoader worker processes per engine worker): one collect
pass of the statistics of the first quantized stage over ``--images`` calibration images, on the
Ray executor with ``--workers`` actors. Prints images/s per worker and the waiting share, as the
run's log line and ``report.json`` (``collect_images_per_s_per_worker``, ``collect_data_share``)
give them for every stage.

    python -m benchmarks.collect_throughput [--workers 2] [--images 64] [--settings 1x0 1x1 2x0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def write_photographs(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90, about ImageNet's 375x500) cut from scikit-learn's sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images   # two 427x640 RGB photographs
    rng = np.random.default_rng(seed)
    folder = root / "train" / "n00000"
    folder.mkdir(parents=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(300, 450)), int(rng.integers(400, 500))
        big = np.array(Image.fromarray(photo).resize((max(w, photo.shape[1]), max(h, photo.shape[0]))))
        y, x = int(rng.integers(0, big.shape[0] - h + 1)), int(rng.integers(0, big.shape[1] - w + 1))
        Image.fromarray(big[y:y + h, x:x + w]).save(folder / f"{i:05d}.jpg", quality=90)
    return root / "train"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="calibration images of the pass (all workers)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--settings", nargs="+", default=["1x0", "1x1"],
                   help="THREADSxLOADERS: torch threads per worker x DataLoader workers per worker")
    args = p.parse_args(argv)

    from bgd_dist.config import ModelConfig, QuantizeConfig, from_mapping
    from bgd_dist.distributed.ray_executor import RayExecutor
    from bgd_dist.messages import CollectRequest, LayerRequest
    from bgd_dist.plan import build_plan
    from bgd_dist.student import student_state
    from classification.adapter import ClassificationAdapter

    import yaml

    rules = yaml.safe_load((Path(__file__).resolve().parent.parent / "pipelines" / "resnet50_small.yaml")
                           .read_text())["quantize"]
    q = from_mapping(QuantizeConfig, rules, "quantize")
    with tempfile.TemporaryDirectory() as tmp:
        train = write_photographs(Path(tmp), args.images)
        model = ModelConfig("classification", "resnet50")
        print(f"collect_throughput resnet50 (random weights), {args.images} JPEGs (~375x500, quality 90), "
              f"RandomResizedCrop 224, batch {args.batch}, {args.workers} Ray workers, first stage's statistics")
        for setting in args.settings:
            threads, loaders = (int(v) for v in setting.split("x"))
            data = {"train": str(train), "val": str(train), "num_workers": loaders}
            adapter = ClassificationAdapter(model, data)
            teacher = adapter.build_model()
            plan = build_plan(teacher, q.rules, adapter.trace, q.n_centroids, q.objective, q.clamp)
            first = [plan.layer(n) for n in plan.stages[0]]
            layers = [LayerRequest(l.name, l.geometry, l.block_size, "gram") for l in first]
            with RayExecutor(num_workers=args.workers, threads_per_worker=threads, num_cpus=args.workers) as ex:
                ex.start(model, data)
                ex.load_student(student_state(teacher))
                ex.collect(CollectRequest(layers, args.workers * args.batch, args.batch, 1))   # warm-up
                result = ex.collect(CollectRequest(layers, args.images, args.batch, 0))
            rates = ", ".join(f"{r:.2f}" for r in result.shard_rates)
            print(f"collect_throughput threads_per_worker={threads} data.num_workers={loaders}: "
                  f"{result.images_per_s:.2f} images/s per worker ({rates}), {100 * result.data_share:.0f}% of the "
                  f"time waiting for images, {result.n_images / (result.seconds / args.workers):.2f} images/s in all")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
