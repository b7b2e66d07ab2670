import json

import pytest

from bgd_dist import cli

PAPER = {  # METHOD §5: pipeline -> (compressed MB, uncompressed MB)
    "resnet18_small": (1.54, 44.59),
    "resnet18_large": (1.03, 44.59),
    "resnet50_small": (5.09, 97.49),
    "resnet50_large": (3.18, 97.49),
    "resnet50_semisup_small": (5.20, 97.49),
    "maskrcnn_r50_fpn": (6.65, 169.58),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_bgd_size_reproduces_the_paper(name, capsys):
    assert cli.main(["size", f"pipelines/{name}.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    compressed, uncompressed = PAPER[name]
    assert out["compressed_mb"] == pytest.approx(compressed, abs=0.005)
    assert out["uncompressed_mb"] == pytest.approx(uncompressed, abs=0.005)
    assert out["ratio"] == pytest.approx(out["uncompressed_mb"] / out["compressed_mb"])
    assert sum(l["mb"] for l in out["layers"]) + out["other_mb"] == pytest.approx(out["compressed_mb"])


def test_bgd_size_table(capsys):
    assert cli.main(["size", "pipelines/resnet18_small.yaml"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "(uncompressed)" in out
    assert "compressed 1.54 MB (28.9x)" in out


def test_index_bits_accounting():
    from bgd_dist.core.layouts import LayerGeometry
    from bgd_dist.core.sizing import layer_size

    g = LayerGeometry("conv2d", (64, 64, 3, 3))
    s = layer_size("x", g, 9, 256, False)
    assert s.index_bytes == 64 * 64 * 1          # one byte per subvector (K = 256)
    assert s.centroid_bytes == 256 * 9 * 2       # fp16 centroids
    assert s.bits_per_weight == pytest.approx((64 * 64 * 8 + 256 * 9 * 16) / (64 * 64 * 9))
