"""Importer of the reference's (kill-the-bits) released checkpoints, METHOD.md §6."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from bgd_dist.core.kmeans import clamp_n_centroids
from bgd_dist.core.layouts import LayerGeometry, from_subvectors, geometry_of
from bgd_dist.fileformat import load_compressed, read_header
from bgd_dist.interop import import_ktb, ktb_to_model
from bgd_dist.interop.ktb import KtbImportError, assignments_to_long
from bgd_dist.nn.modules import PQLayer


def reference_weight_from_centroids(centroids, assignments, n_blocks, k, conv):
    """The reference's reconstruction, spelled out (METHOD §6): gather, transpose to
    (d, n_blocks*C_out), split into n_blocks column chunks, stack them vertically to
    (n_blocks*d, C_out), transpose, reshape to the weight shape."""
    unrolled = torch.cat(centroids[assignments].t().chunk(n_blocks, dim=1), dim=0)
    if conv:
        c_in_k2, c_out = unrolled.shape
        return unrolled.t().reshape(c_out, c_in_k2 // (k * k), k, k)
    return unrolled.t()


@pytest.mark.parametrize("shape,block_size", [((8, 4, 3, 3), 9), ((8, 4, 3, 3), 18), ((6, 16, 1, 1), 4),
                                              ((6, 16, 1, 1), 8), ((10, 16), 4), ((5, 12), 12)])
def test_reference_reconstruction_equals_from_subvectors(shape, block_size):
    gen = torch.Generator().manual_seed(sum(shape) + block_size)
    conv = len(shape) == 4
    geometry = LayerGeometry("conv2d" if conv else "linear", shape)
    n_blocks = geometry.row_length // block_size
    centroids = torch.randn(7, block_size, generator=gen)
    assignments = torch.randint(7, (n_blocks * shape[0],), generator=gen)
    expected = reference_weight_from_centroids(centroids, assignments, n_blocks, shape[-1] if conv else 1, conv)
    assert torch.equal(from_subvectors(centroids[assignments], geometry, block_size), expected)


def test_int16_assignments_map_to_unsigned_indexes():
    stored = torch.tensor([0, 1, 2047, 32767, -32768, -1], dtype=torch.int16)
    assert assignments_to_long(stored, 65536).tolist() == [0, 1, 2047, 32767, 32768, 65535]
    assert assignments_to_long(torch.tensor([0, 255], dtype=torch.uint8), 256).tolist() == [0, 255]
    with pytest.raises(KtbImportError, match=r"out of range \[0, 2048\)"):
        assignments_to_long(torch.tensor([-1], dtype=torch.int16), 2048)
    with pytest.raises(KtbImportError, match="dtype"):
        assignments_to_long(torch.tensor([0.0]), 2)


def make_reference_checkpoint(seed: int = 0) -> dict:
    """A random ResNet-18 written exactly as the reference's quantize.py writes it."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    state: dict = {"conv1": {k: v.half() for k, v in model.conv1.state_dict().items()},
                   "fc_bias": {"bias": nn.Parameter(0.1 * torch.randn(1000, generator=gen))}}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            state[name] = {"weight": (torch.rand(module.num_features, generator=gen) + 0.5).half(),
                           "bias": (0.1 * torch.randn(module.num_features, generator=gen)).half()}
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and name != "conv1":
            is_conv = isinstance(module, nn.Conv2d)
            k = module.kernel_size[0] if is_conv else 1
            block_size = 9 if k == 3 else 4
            geometry = geometry_of(module)
            n_blocks = geometry.row_length // block_size
            n_centroids = clamp_n_centroids(256 if is_conv else 2048, n_blocks * geometry.n_rows)
            assignments = torch.randint(n_centroids, (n_blocks * geometry.n_rows,), generator=gen)
            state[name] = {"centroids": (0.05 * torch.randn(n_centroids, block_size, generator=gen)).half(),
                           "assignments": assignments.short() if "fc" in name else assignments.byte(),
                           "n_blocks": n_blocks, "is_conv": is_conv, "k": k}
    return state


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    state = make_reference_checkpoint()
    path = tmp_path_factory.mktemp("ktb") / "resnet18_small_blocks.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def imported(reference_file, tmp_path_factory):
    src, state = reference_file
    out = tmp_path_factory.mktemp("bgd") / "resnet18.bgd"
    plan = import_ktb(src, "resnet18", out)
    return out, plan, state


def test_reference_checkpoint_has_the_documented_format(reference_file):
    _, state = reference_file
    assert state["layer1.0.conv1"]["assignments"].dtype == torch.uint8
    assert state["fc"]["assignments"].dtype == torch.int16
    assert state["fc"]["centroids"].shape == (2048, 4) and state["fc"]["centroids"].dtype == torch.float16
    assert state["layer1.0.conv1"]["n_blocks"] == 64 and state["layer2.0.downsample.0"]["k"] == 1
    assert set(state["bn1"]) == {"weight", "bias"}


def test_import_decodes_the_reference_weights(imported):
    out, plan, state = imported
    model = load_compressed(out)
    header = read_header(out)
    assert header["arch"] == {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 1000}}
    assert header["metadata"]["source"] == "kill-the-bits"
    assert plan.layer("conv1").skip
    assert len(plan.quantized) == 20
    for entry in plan.quantized:
        layer = model.get_submodule(entry.name)
        src = state[entry.name]
        assert isinstance(layer, PQLayer)
        assert (entry.block_size, entry.n_centroids) == tuple(src["centroids"].shape)[::-1]
        expected = reference_weight_from_centroids(src["centroids"].float(), assignments_to_long(
            src["assignments"], src["centroids"].shape[0]), src["n_blocks"], src["k"], src["is_conv"])
        assert torch.equal(layer.weight.detach(), expected), entry.name
        assert torch.equal(layer.centroids.detach(), src["centroids"].float())
    assert plan.layer("fc").n_centroids == 2048 and plan.layer("fc").block_size == 4
    assert plan.layer("layer2.0.downsample.0").block_size == 4
    assert torch.equal(model.conv1.weight, state["conv1"]["weight"].float())
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert torch.equal(bn.weight, state[name]["weight"].float())
            assert torch.equal(bn.bias, state[name]["bias"].float())
            assert torch.equal(bn.running_mean, torch.zeros(bn.num_features))
            assert torch.equal(bn.running_var, torch.ones(bn.num_features))
    assert torch.equal(model.fc.bias, state["fc_bias"]["bias"].detach())


def test_imported_model_runs_and_matches_in_memory_conversion(imported):
    out, _, state = imported
    loaded = load_compressed(out)
    direct, _ = ktb_to_model(state, "resnet18")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = loaded(x)
        assert y.shape == (2, 1000) and torch.isfinite(y).all()
        assert torch.equal(y, direct(x))


def test_running_statistics_in_the_file_are_used():
    state = make_reference_checkpoint(seed=1)
    state["bn1"]["running_mean"] = torch.full((64,), 0.25)
    state["bn1"]["running_var"] = torch.full((64,), 2.0)
    model, _ = ktb_to_model(state, "resnet18")
    assert torch.equal(model.bn1.running_mean, torch.full((64,), 0.25))
    assert torch.equal(model.bn1.running_var, torch.full((64,), 2.0))


def test_uncompressed_layers_are_skipped_in_the_plan():
    state = make_reference_checkpoint(seed=2)
    layer = torchvision.models.resnet18(weights=None).layer1[0].conv2
    state["layer1.0.conv2"] = {"weight": layer.weight.detach().half()}
    model, plan = ktb_to_model(state, "resnet18")
    assert plan.layer("layer1.0.conv2").skip
    assert isinstance(model.layer1[0].conv2, nn.Conv2d)
    assert torch.equal(model.layer1[0].conv2.weight, layer.weight.detach().half().float())


def test_missing_keys_are_named(tmp_path):
    state = make_reference_checkpoint(seed=3)
    del state["layer3.1.conv2"]
    with pytest.raises(KtbImportError, match="missing key 'layer3.1.conv2'"):
        ktb_to_model(state, "resnet18")
    state = make_reference_checkpoint(seed=3)
    del state["layer1.0.conv1"]["n_blocks"]
    with pytest.raises(KtbImportError, match=r"missing key 'layer1.0.conv1'\['n_blocks'\]"):
        ktb_to_model(state, "resnet18")
    state = make_reference_checkpoint(seed=3)
    del state["fc_bias"]
    src = tmp_path / "broken.pth"
    torch.save(state, src)
    with pytest.raises(KtbImportError, match="broken.pth: missing key 'fc_bias'"):
        import_ktb(src, "resnet18", tmp_path / "out.bgd")
    assert not (tmp_path / "out.bgd").exists()


def test_inconsistent_layer_entries_are_named():
    state = make_reference_checkpoint(seed=4)
    state["layer2.0.conv1"]["n_blocks"] = 7
    with pytest.raises(KtbImportError, match=r"'layer2.0.conv1'\['n_blocks'\] is 7"):
        ktb_to_model(state, "resnet18")
    state = make_reference_checkpoint(seed=4)
    state["layer2.0.conv1"]["assignments"] = state["layer2.0.conv1"]["assignments"][:-1]
    with pytest.raises(KtbImportError, match=r"'layer2.0.conv1'\['assignments'\] has"):
        ktb_to_model(state, "resnet18")


def test_wrong_arch_is_named(reference_file, tmp_path):
    src, _ = reference_file
    with pytest.raises(KtbImportError, match="missing key 'layer1.0.conv3'.*another architecture"):
        import_ktb(src, "resnet50", tmp_path / "out.bgd")
    with pytest.raises(KtbImportError, match="unknown arch 'vgg16'"):
        import_ktb(src, "vgg16", tmp_path / "out.bgd")
    state = make_reference_checkpoint(seed=5)
    state["layer4.2.conv1"] = state["layer4.1.conv1"]
    with pytest.raises(KtbImportError, match="unexpected key 'layer4.2.conv1'"):
        ktb_to_model(state, "resnet18")
    assert not (tmp_path / "out.bgd").exists()


def test_unreadable_source(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KtbImportError, match="bad.pth: cannot read"):
        import_ktb(bad, "resnet18", tmp_path / "out.bgd")
    lst = tmp_path / "list.pth"
    torch.save([1, 2], lst)
    with pytest.raises(KtbImportError, match="expected a dict"):
        import_ktb(lst, "resnet18", tmp_path / "out.bgd")
