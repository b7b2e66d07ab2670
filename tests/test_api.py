"""The Python API: compress a user's nn.Module (a class defined in the test, a torchvision model)
with the serial and the Ray executor; the file round-trips; errors name what is wrong."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bgd_dist
from bgd_dist.api import ModuleAdapter, preset_rules
from bgd_dist.fileformat import FormatError, inspect_file
from bgd_dist.nn.modules import pq_layers
from bgd_dist.worker import Worker

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(n_iter=4, n_calibration=32, batch_size=8, progress=False)
RESNET = dict(FAST, n_iter=1, n_centroids=16, n_calibration=16)


def local_net():
    """A model whose class exists only inside this function: no module a Ray worker could import."""

    class LocalNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
            self.proj = nn.Conv2d(16, 16, 1)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.proj(torch.relu(self.conv(x))))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    return LocalNet().eval(), LocalNet


def inputs(n=48, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def codes(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith((".centroids", ".assignments"))}


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    model, cls = local_net()
    out = tmp_path_factory.mktemp("serial")
    compressed, report = bgd_dist.compress(model, inputs(), out, num_workers=2, eval_data=inputs(16),
                                           distill={"global": {"epochs": 1, "iterations_per_epoch": 2}}, **FAST)
    return model, cls, out, compressed, report


def test_compress_a_local_class_in_process(serial_run):
    model, cls, out, compressed, report = serial_run
    # the preset: the stem reads the raw input and stays dense; the rest is quantized
    assert set(pq_layers(compressed)) == {"conv", "proj", "head"}
    assert report["ratio"] > 1 and (out / "model.bgd").is_file() and (out / "report.json").is_file()
    assert report["metrics_before"]["output_rel_error"] == 0.0
    assert 0 < report["metrics_after"]["output_rel_error"] < 1
    x = inputs(4)
    with torch.no_grad():
        assert not torch.equal(compressed(x), model(x))             # it is the compressed model
    # the file does not know the local class: loading says how, and the given model loads
    with pytest.raises(FormatError, match=r"model=<a LocalNet instance>"):
        bgd_dist.load_compressed(out / "model.bgd")
    again = bgd_dist.load_compressed(out / "model.bgd", model=cls())
    with torch.no_grad():
        torch.testing.assert_close(again(x), compressed(x), rtol=0, atol=0)
    assert "accounted_mb" not in inspect_file(out / "model.bgd")    # inspect still works


def test_ray_gives_the_serial_codebooks(serial_run, ray_cluster, tmp_path):
    """The adapter (model and data by value, class defined in a function) goes to the Ray actors;
    statistics and codebooks equal the in-process run's, the distilled centroids up to rounding."""
    from bgd_dist.distributed.ray_executor import RayExecutor

    model, cls, _, serial, _ = serial_run
    executor = RayExecutor(num_workers=2)
    try:
        ray_model, report = bgd_dist.compress(model, inputs(), tmp_path, executor=executor, num_workers=2,
                                              eval_data=inputs(16),
                                              distill={"global": {"epochs": 1, "iterations_per_epoch": 2}}, **FAST)
    finally:
        executor.close()
    a, b = codes(serial), codes(ray_model)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(".assignments"):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3)


def test_torchvision_model_with_a_dataloader_and_a_recorded_architecture(tmp_path):
    """A DataLoader of (input, label) pairs; ``arch`` makes the file load without the model."""
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    data = DataLoader(TensorDataset(inputs(32, 16), torch.zeros(32, dtype=torch.long)), batch_size=8)
    compressed, report = bgd_dist.compress(
        model, data, tmp_path, rules="paper-large",
        arch={"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}}, **RESNET)
    layers = pq_layers(compressed)
    assert "conv1" not in layers and "layer1.0.conv1" in layers and "fc" in layers
    assert layers["layer1.0.conv1"].block_size == 18          # paper-large: 3x3 d=18
    standalone = bgd_dist.load_compressed(tmp_path / "model.bgd")
    x = inputs(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(standalone(x), compressed(x), rtol=0, atol=0)
    assert report["metrics_after"] is None                     # no eval_data: no evaluation


def test_torchvision_model_on_ray(ray_cluster, tmp_path):
    from bgd_dist.distributed.ray_executor import RayExecutor

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    executor = RayExecutor(num_workers=2)
    try:
        compressed, report = bgd_dist.compress(
            model, lambda: iter(inputs(32, 16).split(8)), tmp_path, executor=executor, num_workers=2,
            rules=[{"match": r"layer1\..*", "kernel": [3, 3], "block_size": 9},
                   {"match": "fc", "block_size": 4}, {"match": ".*", "skip": True}],   # 5 layers: seconds
            **RESNET)
    finally:
        executor.close()
    assert set(pq_layers(compressed)) == {"layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"}
    assert report["compressed_mb"] < report["uncompressed_mb"]


def test_target_mb_and_the_objective(tmp_path):
    model, _ = local_net()
    compressed, report = bgd_dist.compress(model, inputs(), tmp_path, target_mb=0.005, objective="weights", **FAST)
    assert report["compressed_mb"] <= 0.005 and pq_layers(compressed)


def test_quantize_options_beyond_the_arguments(tmp_path):
    """``quantize=``: any key of the pipeline's quantize section (here the teacher target and a
    held-out share), validated by name like the YAML."""
    model, _ = local_net()
    _, report = bgd_dist.compress(model, inputs(), tmp_path, objective="hessian",
                                  quantize={"holdout": 0.25, "hessian": {"target": "teacher"}}, **FAST)
    later = report["stages"][-1]
    assert any(v is not None for v in later["objective_holdout"].values())
    assert "teacher's outputs" in (tmp_path / "log.jsonl").read_text() or '"target": "teacher"' in \
        (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="bias_corection"):
        bgd_dist.compress(model, inputs(), tmp_path / "bad", quantize={"bias_corection": True}, **FAST)


def test_a_custom_loss_is_used(tmp_path):
    calls = []

    def loss(student_out, teacher_out):
        calls.append(1)
        return (student_out - teacher_out).pow(2).mean()

    model, _ = local_net()
    _, report = bgd_dist.compress(model, inputs(), tmp_path, distill={"layerwise": {"iterations": 2}}, loss=loss,
                                  **FAST)
    assert calls and all(s["loss_start"] is not None for s in report["stages"])


def test_bad_inputs_are_named(tmp_path):
    model, _ = local_net()
    with pytest.raises(TypeError, match="iterator can be read only once"):
        bgd_dist.compress(model, iter([inputs()]), tmp_path, **FAST)
    with pytest.raises(ValueError, match="unknown preset 'paper-medium'"):
        bgd_dist.compress(model, inputs(), tmp_path, rules="paper-medium", **FAST)
    with pytest.raises(ValueError, match=r"rules\[0\] {match: 'conv_1'} matches no layer"):
        bgd_dist.compress(model, inputs(), tmp_path, rules=[{"match": "conv_1", "skip": True},
                                                            {"match": ".*", "block_size": 4}], **FAST)


def test_the_worker_accepts_an_adapter_instance():
    model, _ = local_net()
    worker = Worker(ModuleAdapter(model, inputs()), None, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(worker.teacher(inputs(2)), model(inputs(2)))
    assert worker.teacher is not model                      # the user's model is not touched


def test_presets_leave_what_they_cannot_quantize_dense():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 5), nn.Conv2d(6, 10, 3), nn.Flatten(), nn.Linear(6, 3))
    rules = {r.match: r for r in preset_rules(model, "paper-small")}
    assert rules["0"].skip and rules["1"].skip            # raw input; a 5x5 kernel
    assert rules["2"].block_size == 9                     # 6*3*3 = 54 = 6 blocks of 9
    assert rules["4"].skip                                # 6 inputs: d=4 does not divide
