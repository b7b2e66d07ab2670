import pytest

from bgd_dist import cli
from bgd_dist.config import ConfigError, load_pipeline, require


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


BASE = """
model: {adapter: classification, arch: resnet18}
quantize:
  rules:
    - {match: conv1, skip: true}
    - {match: ".*", block_size: 4}
"""


def test_loads_with_defaults_and_is_frozen(tmp_path):
    cfg = load_pipeline(write(tmp_path, BASE))
    assert cfg.name == "p"
    assert cfg.quantize.n_iter == 100 and cfg.finetune.layerwise.lr == 0.05 and cfg.finetune.global_.epochs == 9
    with pytest.raises(Exception):
        cfg.name = "x"


def test_paper_pipelines_carry_the_reference_hyper_parameters():
    cfg = load_pipeline("pipelines/resnet50_small.yaml")
    q, lw, gl = cfg.quantize, cfg.finetune.layerwise, cfg.finetune.global_
    assert (q.n_iter, q.n_calibration, q.n_centroids) == (100, 1024, 256)
    assert (lw.iterations, lw.lr, lw.momentum, lw.weight_decay, lw.batch_size) == (2500, 0.05, 0.9, 1e-4, 128)
    assert (gl.epochs, gl.iterations_per_epoch, gl.lr, gl.lr_step_epochs, gl.batch_size) == (9, 10000, 0.01, 3, 128)
    assert cfg.data == {"train": "???", "val": "???", "eval_batch_size": 256}
    with pytest.raises(ConfigError, match=r"data.train is required: pass --set data.train="):
        require(cfg.data["train"], "data.train", cfg)


@pytest.mark.parametrize("text, match", [
    (BASE + "bogus: 1\n", "unknown key 'bogus'"),
    (BASE.replace("rules:", "n_iterr: 3\n  rules:"), "quantize: unknown key 'n_iterr'"),
    (BASE.replace("block_size: 4}", "block_size: 4, dd: 2}"), r"quantize.rules\[1\]: unknown key 'dd'"),
    (BASE.replace("block_size: 4", "block_size: four"), r"quantize.rules\[1\].block_size: expected an integer"),
    (BASE + "executor: {kind: mpi}\n", "executor: kind: unknown executor 'mpi'"),
    (BASE + "executor: {threads_per_worker: 0}\n", "threads_per_worker: must be >= 1"),
    ("model: {adapter: classification, arch: resnet18}\n", "missing required key 'quantize'"),
    ("model: [1, 2\n", "malformed YAML"),
    ("- 1\n", "must be a mapping"),
])
def test_bad_pipelines_name_the_file_and_key(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_pipeline(p)
    assert str(p) in str(e.value)


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_pipeline(p, ["quantize.n_iter=7", "data.train=/x", "finetune.global.enabled=false"])
    assert cfg.quantize.n_iter == 7 and cfg.data["train"] == "/x" and not cfg.finetune.global_.enabled
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_pipeline(p, ["quantize.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_pipeline(p, ["quantize.n_iter"])


def test_missing_file_and_cli_error_message(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")
    assert cli.main(["size", str(write(tmp_path, BASE + "bogus: 1\n"))]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_config_yaml_round_trip(tmp_path):
    from bgd_dist.config import pipeline_from_dict
    import yaml

    cfg = load_pipeline("pipelines/maskrcnn_r50_fpn.yaml")
    again = pipeline_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_the_shapes_plus_pipeline_is_the_benchmarked_combination():
    """``pipelines/shapes_maskrcnn_plus.yaml`` is the demo pipeline with the settings of the end-metrics
    variant the README reports for it: the figure measured is the pipeline shipped."""
    import dataclasses

    from benchmarks.objective import END_VARIANTS, PLUS_VARIANTS

    data = [f"data.{k}=x" for k in ("train_images", "train_annotations", "val_images", "val_annotations")]
    variant = dict(END_VARIANTS)[PLUS_VARIANTS["shapes"]]
    base = load_pipeline("pipelines/shapes_maskrcnn.yaml", [*data, *variant])
    plus = load_pipeline("pipelines/shapes_maskrcnn_plus.yaml", data)
    assert dataclasses.replace(plus, name=base.name) == base


def test_the_mask_bits_variant_moves_bytes_from_fc6_to_the_mask_branch_at_no_larger_size():
    """The benchmark's "mask d=4" shapes settings address the pipeline's rules by index: they must still give
    the mask branch d = 4 and fc6 K = 128, change nothing else, and not make the model larger."""
    from benchmarks.objective import MASK_BITS_SETTINGS
    from bgd_dist.adapters import make_adapter, plan_for
    from bgd_dist.core.sizing import size_report

    data = [f"data.{k}=x" for k in ("train_images", "train_annotations", "val_images", "val_annotations")]
    base = load_pipeline("pipelines/shapes_maskrcnn.yaml", data)
    moved = load_pipeline("pipelines/shapes_maskrcnn.yaml", [*data, *MASK_BITS_SETTINGS["shapes"]])
    model = make_adapter(base.model, base.data).build_model()
    before, after = plan_for(base, model), plan_for(moved, model)
    changed = {l.name: (l.block_size, l.n_centroids) for l in after.layers
               if (l.block_size, l.n_centroids) != (before.layer(l.name).block_size, before.layer(l.name).n_centroids)}
    mask = [l.name for l in before.layers if l.name.startswith("roi_heads.mask_head.")]   # 3x3, d = 9 before
    assert len(mask) == 4 and after.layer("roi_heads.mask_predictor.conv5_mask").block_size == 4
    assert changed == {"roi_heads.box_head.fc6": (16, 128), **{n: (4, 256) for n in mask}}
    base_mb, moved_mb = size_report(model, before).compressed_mb, size_report(model, after).compressed_mb
    assert base_mb - 0.001 < moved_mb <= base_mb
