"""The paper's Mask R-CNN allocation on torchvision's and on detectron2's R50-FPN, layer by layer.

    python -m benchmarks.detectron2_size

Prints both pipelines' ``bgd size`` totals, every layer whose size differs, and where the difference
in parameters comes from (the class heads, frozen BatchNorm kept as buffers). Needs detectron2
(``make detectron2``); architecture only, no weights, no data.
"""

from __future__ import annotations

from torch import nn

from bgd_dist.adapters import build_architecture, make_adapter, plan_for
from bgd_dist.config import load_pipeline
from bgd_dist.core.sizing import size_report

PIPELINES = {"torchvision": "pipelines/maskrcnn_r50_fpn.yaml",
             "detectron2": "pipelines/maskrcnn_r50_fpn_detectron2.yaml"}
HEADS = {"torchvision": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                         "roi_heads.mask_predictor.mask_fcn_logits"),
         "detectron2": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                        "roi_heads.mask_head.predictor")}


def frozen_bn_affine(model: nn.Module) -> tuple[int, int]:
    """(scale and shift values of the frozen BatchNorm layers, how many of them are parameters)."""
    total = as_params = 0
    for m in model.modules():
        if type(m).__name__ == "FrozenBatchNorm2d":
            total += m.weight.numel() + m.bias.numel()
            as_params += sum(p.numel() for p in m.parameters(recurse=False))
    return total, as_params


def main() -> None:
    rows = {}
    for impl, path in PIPELINES.items():
        cfg = load_pipeline(path, [])
        adapter = make_adapter(cfg.model, cfg.data)
        model = build_architecture(adapter.arch())
        report = size_report(model, plan_for(cfg, model, adapter))
        heads = sum(p.numel() for name in HEADS[impl] for p in model.get_submodule(name).parameters())
        rows[impl] = (report, sum(p.numel() for p in model.parameters()), heads, *frozen_bn_affine(model))
    for impl, (report, n_params, heads, bn, bn_params) in rows.items():
        print(f"{impl:<12} uncompressed {report.uncompressed_mb:.2f} MB -> compressed {report.compressed_mb:.2f} MB "
              f"({report.ratio:.1f}x); parameters {n_params:,}; class heads {heads:,}; frozen BN scale+shift "
              f"{bn:,} values, {bn_params:,} of them parameters; other fp32 {report.other_bytes / 2**20:.4f} MB")
    (tv, tv_n, tv_h, _, tv_bn), (d2, d2_n, d2_h, _, d2_bn) = rows["torchvision"], rows["detectron2"]
    print(f"parameters: torchvision - detectron2 = {tv_n - d2_n:,} = class heads {tv_h - d2_h:,} "
          f"+ frozen BN counted as parameters {tv_bn - d2_bn:,} ({(tv_bn - d2_bn) * 4 / 2**20:.2f} MB)")
    print("layers that differ (in order; the other layers have the same shape, d, K and size):")
    def mb(layer) -> str:
        return f"{(layer.n_weights * 4 if layer.skip else layer.nbytes) / 2**20:.4f} MB" \
            + (" (fp32)" if layer.skip else f" (d={layer.block_size})")

    for a, b in zip(tv.layers, d2.layers):
        if (a.n_weights, a.nbytes, a.block_size, a.n_centroids) != (b.n_weights, b.nbytes, b.block_size, b.n_centroids):
            print(f"  {a.name:<40} {'x'.join(map(str, a.weight_shape)):<12} {mb(a)} | "
                  f"{b.name:<34} {'x'.join(map(str, b.weight_shape)):<12} {mb(b)}")
    assert len(tv.layers) == len(d2.layers)


if __name__ == "__main__":
    main()
