"""Deployment: the dense model, its exports (state dict, TorchScript, torch.export, ONNX, safetensors)
and the deployment metadata a compressed file records. Every export computes the quantized model's outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from torch import nn

from bgd_dist import load_compressed
from bgd_dist.cli import main
from bgd_dist.export import FORMATS, export_file, load_safetensors_metadata, to_dense
from bgd_dist.fileformat import FormatError, format_inspect, inspect_file, read_header, save_compressed, \
    update_metadata
from bgd_dist.nn.modules import pq_layers
from test_fileformat import ARCH18, SMALL_RULES, random_student

SIZE = 32
METADATA = {
    "name": "random-r18",
    "preprocessing": {"input_size": [3, SIZE, SIZE], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "class_names": [f"class{i}" for i in range(1000)],
    "pipeline": {"name": "random-r18", "adapter": "classification", "arch": "resnet18", "weights": None,
                 "checkpoint": "/nowhere/r18.pth", "objective": "weights"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, plan = random_student(SMALL_RULES, seed=1)
    path = tmp_path_factory.mktemp("export") / "model.bgd"
    save_compressed(path, model, plan, ARCH18, metadata=METADATA)
    return path


@pytest.fixture(scope="module")
def quantized(saved):
    return load_compressed(saved)


@pytest.fixture(scope="module")
def dense(saved):
    return load_compressed(saved, dense=True)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def expected(quantized, x):
    with torch.no_grad():
        return quantized(x)


def test_dense_load_is_the_plain_architecture(dense, quantized, x, expected):
    assert not pq_layers(dense) and not dense.training
    plain = torchvision.models.resnet18()
    plain.load_state_dict(dense.state_dict(), strict=True)          # the original architecture
    for name, layer in pq_layers(quantized).items():
        assert type(dense.get_submodule(name)) in (nn.Conv2d, nn.Linear)
        assert torch.equal(dense.get_submodule(name).weight, layer.decode().detach())
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), expected)
        assert torch.equal(dense(x), expected)
    # to_dense leaves the quantized model as it was
    copy = to_dense(quantized)
    assert pq_layers(quantized) and not pq_layers(copy)


def test_torchscript_of_the_dense_model(saved, dense, x, expected, tmp_path):
    scripted = torch.jit.script(dense)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-5)
    out = export_file(saved, "torchscript", tmp_path / "m.ts.pt")
    extra = {"bgd.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
    meta = json.loads(extra["bgd.json"])
    assert meta["arch"] == ARCH18 and meta["metadata"]["preprocessing"] == METADATA["preprocessing"]


def test_torch_export_of_the_dense_model(dense, x, expected):
    program = torch.export.export(dense, (x,))
    # the weights are constants of the graph, not decoded in it: no indexing op remains
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("index" in op for op in ops)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-5)


def test_dense_state_dict_export(saved, x, expected, tmp_path):
    out = main(["export", str(saved), "--format", "dense", "--out", str(tmp_path / "dense.pt")])
    assert out == 0
    state = torch.load(tmp_path / "dense.pt", weights_only=True)
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def test_safetensors_export(saved, x, expected, tmp_path):
    from safetensors.torch import load_file

    out = export_file(saved, "safetensors", tmp_path / "m.safetensors")
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
    meta = load_safetensors_metadata(out)
    assert meta["arch"] == ARCH18 and meta["metadata"]["class_names"][:2] == ["class0", "class1"]
    assert meta["plan"] == read_header(saved)["plan"]


def test_onnx_export_runs_in_onnxruntime(saved, x, expected, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = export_file(saved, "onnx", tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]          # one self-contained file, no temporaries
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):                                    # dynamic batch dimension
        got = session.run(None, {"input": batch.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected[: len(batch)], rtol=0, atol=1e-4)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["metadata"])["preprocessing"]["input_size"] == [3, SIZE, SIZE]


def test_onnx_needs_an_input_size(saved, tmp_path):
    path = tmp_path / "bare.bgd"
    path.write_bytes(saved.read_bytes())
    update_metadata(path, {"preprocessing": None})
    with pytest.raises(ValueError, match=r"bare\.bgd.*--input-size"):
        export_file(path, "onnx", tmp_path / "m.onnx")
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()
    update_metadata(path, {"preprocessing": {"image": "a list of images", "applied_by_the_model": True}})
    with pytest.raises(ValueError, match=r"bare\.bgd.*list of images.*--format torchscript"):
        export_file(path, "onnx", tmp_path / "m.onnx")


def test_failed_export_leaves_nothing(saved, tmp_path, monkeypatch):
    (tmp_path / "m.ts.pt").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("scripting failed")

    monkeypatch.setattr(torch.jit, "save", broken)
    with pytest.raises(RuntimeError, match="scripting failed"):
        export_file(saved, "torchscript", tmp_path / "m.ts.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.ts.pt"] and (tmp_path / "m.ts.pt").read_bytes() == b"old"


def test_writers_refuse_a_quantized_model(quantized, tmp_path):
    from bgd_dist.export import save_dense

    with pytest.raises(ValueError, match="quantized layers"):
        save_dense(tmp_path / "d.pt", quantized)
    assert FORMATS == ("dense", "torchscript", "onnx", "safetensors")


# ----------------------------------------------------------------------------- deployment metadata

def test_update_metadata_keeps_the_tensors(saved, tmp_path, x, expected):
    path = tmp_path / "copy.bgd"
    path.write_bytes(saved.read_bytes())
    payload = saved.read_bytes()[-1000:]
    update_metadata(path, {"metrics": {"teacher": {"top1": 70.0}, "compressed": {"top1": 65.5, "top5": 86.0}}})
    header = read_header(path)
    assert header["metadata"]["metrics"]["compressed"]["top1"] == 65.5
    assert header["metadata"]["class_names"] == METADATA["class_names"]    # merged, not replaced
    assert path.read_bytes()[-1000:] == payload
    with torch.no_grad():
        assert torch.equal(load_compressed(path)(x), expected)
    text = format_inspect(inspect_file(path))
    for needle in ("pipeline: random-r18", "teacher /nowhere/r18.pth", "input_size=[3, 32, 32]",
                   "classes (1000): class0, class1", "metrics (compressed): top1=65.5000, top5=86.0000",
                   "metrics (teacher): top1=70.0000"):
        assert needle in text
    with pytest.raises(FormatError, match="JSON-serialisable"):
        update_metadata(path, {"bad": object()})


def test_a_run_records_what_a_deployer_needs(tmp_path):
    """The toy pipeline: the file names its pipeline, the metrics measured on it, and the adapter's
    preprocessing and class names (None where the adapter does not know them)."""
    from bgd_dist.runner import run
    from toy import toy_config

    cfg = toy_config(finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}},
                     quantize={"n_iter": 2})
    report = run(cfg, tmp_path / "run", progress=False)
    meta = read_header(tmp_path / "run" / "model.bgd")["metadata"]
    assert meta["pipeline"]["name"] == "toy" and meta["pipeline"]["config"]["quantize"]["n_iter"] == 2
    assert meta["metrics"] == {"teacher": report["metrics_before"], "compressed": report["metrics_after"]}
    assert meta["preprocessing"] is None and meta["class_names"] is None
    assert report["file_bytes"] == (tmp_path / "run" / "model.bgd").stat().st_size


def test_classification_adapters_know_preprocessing_and_classes():
    from bgd_dist.adapters import make_adapter
    from bgd_dist.config import ModelConfig

    adapter = make_adapter(ModelConfig(adapter="classification", arch="resnet18", weights="IMAGENET1K_V1"),
                           {"image_size": 160, "resize": 182})
    pre = adapter.preprocessing()
    assert pre["input_size"] == [3, 160, 160] and pre["resize"] == 182 and pre["std"][0] == 0.229
    names = adapter.class_names()
    assert len(names) == 1000 and names[0] == "tench"
    mine = make_adapter(ModelConfig(adapter="classification", arch="resnet18", checkpoint="/x.pth",
                                    kwargs={"num_classes": 10}), {})
    assert mine.class_names() is None
    digits = make_adapter(ModelConfig(adapter="digits", arch="digits_resnet"), {"image_size": 12})
    assert digits.preprocessing()["input_size"] == [1, 12, 12] and digits.class_names()[9] == "9"
