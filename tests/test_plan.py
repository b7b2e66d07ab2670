import pytest
import torch
import torchvision

from bgd_dist.adapters import build_architecture, make_adapter, plan_for
from bgd_dist.config import load_pipeline
from bgd_dist.core.sizing import size_report
from bgd_dist.plan import Plan, Rule, build_plan

RULES = [Rule("conv1", skip=True), Rule("fc", block_size=4, n_centroids=1024),
         Rule(".*", kernel=(3, 3), block_size=9), Rule(".*", kernel=(1, 1), block_size=4)]


def trace(model, size=64):
    return lambda m: m(torch.zeros(1, 3, size, size))


def reference_order(model):
    """METHOD §3: inside a block conv1, conv2, conv3, downsample; fc last."""
    names = ["conv1"]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, layer)):
            convs = ["conv1", "conv2", "conv3"] if hasattr(block, "conv3") else ["conv1", "conv2"]
            names += [f"{layer}.{i}.{c}" for c in convs]
            if block.downsample is not None:
                names.append(f"{layer}.{i}.downsample.0")
    return names + ["fc"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_execution_order_and_stages(arch):
    model = getattr(torchvision.models, arch)().eval()
    plan = build_plan(model, RULES, trace(model))
    assert [l.name for l in plan.layers] == reference_order(model)
    assert all(l.traced for l in plan.layers)
    assert plan.layer("conv1").skip and plan.layer("conv1").stage is None
    # a block's first conv and its downsample read the same tensor: one stage
    first = "layer2.0.conv1"
    assert plan.layer(first).stage == plan.layer("layer2.0.downsample.0").stage
    assert (first, "layer2.0.downsample.0") in plan.stages
    # every other stage holds one layer, in execution order
    flat = [n for stage in plan.stages for n in stage]
    assert sorted(flat) == sorted(l.name for l in plan.quantized)
    n_down = sum(1 for l in plan.layers if "downsample" in l.name)
    assert len(plan.stages) == len(plan.quantized) - n_down
    assert plan.stages[-1] == ("fc",)


def test_execution_order_differs_from_registration_order():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.late = torch.nn.Linear(8, 4)   # registered first, runs last
            self.early = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.late(self.early(x))

    plan = build_plan(Net(), [Rule(".*", block_size=4)], lambda m: m(torch.zeros(2, 4)))
    assert [l.name for l in plan.layers] == ["early", "late"]
    assert plan.stages == (("early",), ("late",))


def test_untraced_layers_are_appended_with_a_warning(caplog):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    plan = build_plan(Net(), [Rule(".*", block_size=4)], lambda m: m(torch.zeros(1, 4)))
    assert [l.name for l in plan.layers] == ["used", "unused"]
    assert not plan.layer("unused").traced
    assert "unused" in caplog.text


def test_rules_first_match_fullmatch_and_errors():
    model = torchvision.models.resnet18()
    plan = build_plan(model, [Rule("layer1\\.0\\.conv1", block_size=3, n_centroids=16)] + RULES)
    assert plan.layer("layer1.0.conv1").block_size == 3
    assert plan.layer("layer1.0.conv1").n_centroids == 16
    assert plan.layer("layer1.0.conv2").block_size == 9      # fullmatch: "layer1.0.conv1" does not match conv2
    # ResNet-50 large: layer1.0.conv1 (64x64x1x1, d=8) is clamped to K=64
    plan50 = build_plan(torchvision.models.resnet50(), [Rule("conv1", skip=True), Rule("fc", block_size=4),
                                                        Rule(".*", kernel=(3, 3), block_size=18),
                                                        Rule(".*", kernel=(1, 1), block_size=8)])
    assert plan50.layer("layer1.0.conv1").n_centroids == 64
    assert plan50.layer("layer1.0.conv1").n_centroids_requested == 256
    with pytest.raises(ValueError, match="no rule matches layer 'conv1'"):
        build_plan(model, RULES[1:])
    with pytest.raises(ValueError, match=r"layer 'layer1.0.conv1'.*d=5.*64, 64, 3, 3"):
        build_plan(model, [Rule("conv1", skip=True), Rule(".*", block_size=5)])
    with pytest.raises(ValueError, match="block_size is required"):
        Rule(".*")
    with pytest.raises(ValueError, match="K.*must be >= 1"):
        Rule(".*", block_size=4, n_centroids=0)


def test_plan_json_round_trip(tmp_path):
    model = torchvision.models.resnet18().eval()
    plan = build_plan(model, RULES, trace(model))
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        Plan.load(tmp_path / "bad.json")


def test_maskrcnn_plan_reaches_every_head_and_matches_bgd_size():
    cfg = load_pipeline("pipelines/maskrcnn_r50_fpn.yaml")
    adapter = make_adapter(cfg.model, cfg.data)
    model = build_architecture(adapter.arch())
    plan = plan_for(cfg, model, adapter)
    assert all(l.traced for l in plan.layers)          # the mask branch ran during the trace
    names = [l.name for l in plan.layers]
    assert names.index("backbone.body.layer1.0.conv1") < names.index("rpn.head.conv.0.0") \
        < names.index("roi_heads.box_head.fc6") < names.index("roi_heads.mask_predictor.conv5_mask")
    assert plan.layer("roi_heads.box_head.fc6").block_size == 16
    assert plan.layer("roi_heads.mask_predictor.conv5_mask").geometry.kind == "conv_transpose2d"
    # the box predictor's two linear layers read the same tensor: one stage
    assert plan.layer("roi_heads.box_predictor.cls_score").stage == plan.layer("roi_heads.box_predictor.bbox_pred").stage
    assert size_report(model, plan).compressed_mb == pytest.approx(6.65, abs=0.005)
