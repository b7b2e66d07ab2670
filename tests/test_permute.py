"""Function-preserving channel permutations (quantize.permute): discovery, exactness, the proxy,
the runner step (Ray == serial, resume)."""

import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.core.layouts import geometry_of
from bgd_dist.permute import apply_permutation, channels_per_subvector, choose_permutation, find_groups
from bgd_dist.runner import run

from toy import BASE, toy_config


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def permute_all(model, groups, seed=1):
    g = torch.Generator().manual_seed(seed)
    for group in groups:
        apply_permutation(model, group, torch.randperm(group.channels, generator=g))


def edges(groups):
    return {(tuple(g.producers), tuple(sorted(g.consumers))) for g in groups}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnets_keep_their_function(arch):
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)()).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    groups, rejected = find_groups(model, lambda m: m(x))
    found = edges(groups)
    if arch == "resnet50":
        assert (("layer1.0.conv1",), ("layer1.0.conv2",)) in found
        assert (("layer1.0.conv2",), ("layer1.0.conv3",)) in found
        assert (("layer4.2.conv2",), ("layer4.2.conv3",)) in found
        # the stem feeds a block's conv1 and its downsample (through bn1, relu and the max pool)
        assert (("conv1",), ("layer1.0.conv1", "layer1.0.downsample.0")) in found
        assert len(groups) == 2 * 16 + 1
    else:
        assert (("layer2.0.conv1",), ("layer2.0.conv2",)) in found
        assert len(groups) == 8
    reasons = {r.producer: r.reason for r in rejected}
    assert "add" in reasons["layer1.0.conv2" if arch == "resnet18" else "layer1.0.conv3"]
    assert "returned" in reasons["fc"]
    # a block's input is shared with the skip: no group ends at a block's input except the stem's
    assert not any(c.endswith("downsample.0") for g in groups for c in g.consumers if g.producers != ["conv1"])
    before = model(x)
    permute_all(model, groups)
    assert torch.allclose(model(x), before, rtol=0, atol=1e-12 * float(before.abs().max()))


def test_a_block_with_downsample_keeps_its_function_and_its_input_is_not_permuted():
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          Bottleneck(8, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2),
                                                                              nn.BatchNorm2d(16))),
                          BasicBlock(16, 16))
    block = randomise_bn(block).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    groups, rejected = find_groups(block, lambda m: m(x))
    # the stem conv feeds the bottleneck's conv1 and its downsample: one permutation for both
    assert edges(groups) == {(("0",), ("3.conv1", "3.downsample.0")), (("3.conv1",), ("3.conv2",)),
                             (("3.conv2",), ("3.conv3",)), (("4.conv1",), ("4.conv2",))}
    stem = next(g for g in groups if g.producers == ["0"])
    assert stem.channel_modules == ["1"]
    before = block(x)
    permute_all(block, groups)
    assert torch.allclose(block(x), before, rtol=0, atol=1e-12 * float(before.abs().max()))


class Branchy(nn.Module):
    """Tensors with consumers that are not permutable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)   # its output is added to a flipped copy of itself
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Linear(8, 8)      # reached through a mean of d's output
        self.f = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)
        self.h = nn.Linear(8, 4)
        self.shared = nn.BatchNorm1d(8)   # used on two tensors: f's output and g's output

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = self.c(self.b(y))
        y = y + y.flip(1)
        z = self.d(y).mean((2, 3))
        z = self.e(z)
        z = self.shared(self.f(z))
        z = self.g(z)
        return self.h(torch.relu(self.shared(z)))


def test_groups_are_rejected_where_a_tensor_has_a_non_permutable_consumer():
    model = randomise_bn(Branchy())
    groups, rejected = find_groups(model, lambda m: m(torch.randn(4, 3, 5, 5)))
    assert edges(groups) == {(("a",), ("b",)), (("b",), ("c",)), (("e",), ("f",))}
    reasons = {r.producer: r.reason for r in rejected}
    assert "flip" in reasons["c"] or "add" in reasons["c"]
    assert "mean" in reasons["d"]
    # one BN on two tensors ties f's channels to g's, which g both consumes and produces
    assert reasons["f"] == reasons["g"]
    assert set(reasons) == {"c", "d", "f", "g", "h"}


class SharedConsumers(nn.Module):
    """Two producers feed the same consumer (called twice), one producer feeds two consumers."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Conv2d(3, 8, 1)
        self.p2 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.cls = nn.Conv2d(8, 2, 1)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        out = []
        for t in (torch.relu(self.p1(x)), torch.relu(self.p2(x))):
            t = nn.functional.relu(self.head(t), inplace=True)
            out.append(self.cls(t).sum() + self.box(t).sum())
        return torch.stack(out)


def test_shared_consumers_are_permuted_together():
    model = SharedConsumers().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    groups, _ = find_groups(model, lambda m: m(x))
    assert edges(groups) == {(("p1", "p2"), ("head",)), (("head",), ("box", "cls"))}
    before = model(x)
    permute_all(model, groups)
    assert torch.allclose(model(x), before, rtol=0, atol=1e-12 * float(before.abs().max()))


def test_the_proxy_is_not_worse_than_the_identity_and_lowers_the_kmeans_error():
    """Correlated input channels spread over the subvectors: the chosen permutation puts the
    correlated ones together, and the weights-only k-means error drops."""
    g = torch.Generator().manual_seed(0)
    rows, channels, d = 128, 32, 4
    base = torch.randn(rows, channels // d, generator=g)
    # channel c is a noisy copy of latent c % 8: groups of 4 correlated channels, interleaved
    weight = base[:, torch.arange(channels) % (channels // d)] + 0.1 * torch.randn(rows, channels, generator=g)
    weight = weight.reshape(rows, channels, 1, 1)
    k = channels_per_subvector("conv2d", tuple(weight.shape), d)
    assert k == 4 and channels_per_subvector("conv2d", (8, 8, 3, 3), 9) == 0
    assert channels_per_subvector("conv2d", (8, 8, 3, 3), 18) == 2
    choice = choose_permutation([(weight, "conv2d", k)], [None])
    assert choice.proxy_after < choice.proxy_before
    again = choose_permutation([(weight, "conv2d", k)], [None])
    assert again.perm == choice.perm   # deterministic
    geometry = geometry_of(nn.Conv2d(channels, rows, 1))

    def error(w):
        return fit_codebook(w, geometry, None, 16, d, n_iter=8, seed=0).objective[-1]

    permuted = weight[:, torch.tensor(choice.perm)]
    assert error(permuted) < 0.8 * error(weight)


def test_shapes_mask_rcnn_groups_keep_every_part_of_the_function():
    from detection.models import build_maskrcnn
    from detection.testing import TINY_KWARGS

    model = build_maskrcnn("maskrcnn_small", **TINY_KWARGS).eval()
    roi = model.roi_heads
    roi.score_thresh, roi.detections_per_img = -1.0, 8
    x = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    groups, rejected = find_groups(model, lambda m: m(x))
    found = edges(groups)
    assert (("roi_heads.box_head.fc6",), ("roi_heads.box_head.fc7",)) in found
    assert (("roi_heads.mask_head.1.0",), ("roi_heads.mask_predictor.conv5_mask",)) in found
    assert (("rpn.head.conv.0.0",), ("rpn.head.bbox_pred", "rpn.head.cls_logits")) in found
    assert (("backbone.body.layer1.0.conv1",), ("backbone.body.layer1.0.conv2",)) in found
    reasons = {r.producer: r.reason for r in rejected}
    assert all(p in reasons for p in ("backbone.fpn.inner_blocks.0.0", "backbone.fpn.layer_blocks.0.0",
                                      "backbone.body.layer1.0.conv2", "roi_heads.box_head.fc7"))
    # every part, on fixed inputs (the detections themselves reorder on round-off ties)
    model = model.double()
    image = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rois = torch.rand(6, 16, 7, 7, dtype=torch.float64)
    mask_in = torch.rand(3, 16, 14, 14, dtype=torch.float64)

    def parts(m):
        features = m.backbone(image)
        return (list(features.values()) + [t for ts in m.rpn.head(list(features.values())) for t in ts]
                + [m.roi_heads.box_head(rois)] + [m.roi_heads.mask_predictor(m.roi_heads.mask_head(mask_in))])

    before = parts(model)
    permute_all(model, groups)
    for a, b in zip(parts(model), before):
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * max(1.0, float(b.abs().max())))


NO_FINETUNE = {"layerwise": {"enabled": False}, "global": {"enabled": False}}


def permute_config(**quantize):
    rules = [{"match": "conv2", "block_size": 18, "n_centroids": 8}] + BASE["quantize"]["rules"]
    return toy_config(quantize={**BASE["quantize"], "rules": rules, "permute": True, **quantize}, finetune=NO_FINETUNE)


def test_a_run_permutes_the_teacher_and_records_it(tmp_path):
    cfg = permute_config()
    report = run(cfg, tmp_path / "a", do_eval=True, progress=False)
    record = json.loads((tmp_path / "a" / "permutations.json").read_text())
    assert [g["producers"] for g in record["groups"]] == [["conv1"]]
    group = record["groups"][0]
    assert group["consumers"] == ["conv2"] and group["channel_modules"] == ["bn1"]
    assert group["proxy_after"] <= group["proxy_before"]
    assert report["permutations"]["groups"] == 1
    assert report["metrics_before"]["agreement"] == 1.0   # the workers' teacher is the permuted one
    events = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [e["producers"] for e in events if e["event"] == "permutation"] == [["conv1"]]


def test_resume_reads_the_permutations_back_and_gives_the_same_file(tmp_path):
    from bgd_dist.runner import InjectedFailure

    cfg = permute_config()
    run(cfg, tmp_path / "full", do_eval=False, progress=False)
    with pytest.raises(InjectedFailure):
        run(cfg, tmp_path / "resumed", do_eval=False, progress=False, fail_after_stage=0)
    record = tmp_path / "resumed" / "permutations.json"
    before = record.read_bytes()
    run(cfg, tmp_path / "resumed", do_eval=False, progress=False, resume=True)
    assert record.read_bytes() == before
    assert (tmp_path / "resumed" / "model.bgd").read_bytes() == (tmp_path / "full" / "model.bgd").read_bytes()


def test_permute_off_writes_nothing_and_changes_nothing(tmp_path):
    cfg = toy_config(finetune=NO_FINETUNE)
    assert cfg.quantize.permute is False
    run(cfg, tmp_path / "off", do_eval=False, progress=False)
    assert not (tmp_path / "off" / "permutations.json").exists()
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert "permutations" not in report


def test_ray_and_serial_give_the_same_permuted_run(ray_cluster, one_thread, tmp_path):
    from bgd_dist.distributed.ray_executor import RayExecutor

    cfg = permute_config()
    reports, records = [], []
    for kind in ("serial", "ray"):
        executor = RayExecutor(num_workers=2) if kind == "ray" else None
        reports.append(run(cfg, tmp_path / kind, executor=executor, progress=False))
        if executor is not None:
            executor.close()
        record = json.loads((tmp_path / kind / "permutations.json").read_text())
        for group in record["groups"]:
            group.pop("seconds")
        records.append(record)
    assert records[0]["groups"][0]["perm"] == records[1]["groups"][0]["perm"]
    assert records[0]["groups"][0]["proxy_after"] == pytest.approx(records[1]["groups"][0]["proxy_after"], rel=1e-9)
    # the Ray workers' teacher is the permuted one: it agrees with itself, and the students score alike
    assert reports[1]["metrics_before"] == reports[0]["metrics_before"]
    assert reports[1]["metrics_after"]["agreement"] == pytest.approx(reports[0]["metrics_after"]["agreement"], abs=0.07)


def test_a_replaced_ray_actor_gets_the_shipped_teacher(ray_cluster, one_thread):
    import ray

    from bgd_dist.adapters import make_adapter
    from bgd_dist.distributed.ray_executor import RayExecutor
    from bgd_dist.runner import evaluate

    cfg = toy_config()
    adapter = make_adapter(cfg.model, cfg.data)
    state = {k: v.clone() for k, v in adapter.build_model().state_dict().items()}
    state["fc.weight"] = -state["fc.weight"]   # another function: agreement with the toy labels drops
    ex = RayExecutor(num_workers=2)
    try:
        ex.start(cfg.model, cfg.data)
        assert evaluate(ex, adapter, "teacher", 32)["agreement"] == 1.0
        ex.load_teacher(state)
        shipped = evaluate(ex, adapter, "teacher", 32)["agreement"]
        assert shipped < 0.5
        ex.fault_injection = lambda actors: ray.kill(actors[0], no_restart=True)
        try:
            assert evaluate(ex, adapter, "teacher", 32)["agreement"] == shipped
        finally:
            ex.fault_injection = None
        assert ex.restarts == 1
    finally:
        ex.close()
