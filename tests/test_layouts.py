"""Weight <-> subvector layouts (METHOD.md §1, §6) and the input rows that match them."""

import pytest
import torch
from torch import nn

from bgd_dist.core.layouts import (
    LayerGeometry,
    check_block_size,
    from_subvectors,
    geometry_of,
    input_rows,
    to_subvectors,
)

# (id, module factory, block size)
LAYERS = [
    ("conv3x3", lambda: nn.Conv2d(4, 6, 3, padding=1), 9),
    ("conv3x3_d18", lambda: nn.Conv2d(4, 6, 3, padding=1), 18),
    ("conv1x1", lambda: nn.Conv2d(8, 6, 1), 4),
    ("conv5x3", lambda: nn.Conv2d(2, 3, (5, 3)), 5),
    ("conv_strided_padded", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), 9),
    ("conv_dilated", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), 12),
    ("conv_groups2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), 9),
    ("conv_depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), 9),
    ("convT_2x2_s2", lambda: nn.ConvTranspose2d(8, 4, 2, stride=2), 4),
    ("convT_3x3_s2", lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1), 3),
    ("convT_groups2", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2), 2),
    ("linear", lambda: nn.Linear(12, 5), 4),
]


def _module(factory):
    torch.manual_seed(0)
    return factory()


def _rows_explicit(weight: torch.Tensor, geometry: LayerGeometry) -> list[torch.Tensor]:
    """Row p of the weight matrix, written out from METHOD §1 by hand."""
    if geometry.kind == "conv_transpose2d":
        c_in, c_out_g, kh, kw = weight.shape
        g = geometry.groups
        cig = c_in // g
        # output column (gi, o, a, b): weight over the input channels of group gi
        return [weight[gi * cig:(gi + 1) * cig, o, a, b]
                for gi in range(g) for o in range(c_out_g) for a in range(kh) for b in range(kw)]
    # conv2d filter p / linear output p, flattened in memory order
    return [weight[p].flatten() for p in range(weight.shape[0])]


@pytest.mark.parametrize("factory,block_size", [l[1:] for l in LAYERS], ids=[l[0] for l in LAYERS])
def test_round_trip_is_exact(factory, block_size):
    module = _module(factory)
    geometry = geometry_of(module)
    w = module.weight.detach()
    sub = to_subvectors(w, geometry, block_size)
    assert sub.shape == (geometry.n_subvectors(block_size), block_size)
    assert torch.equal(from_subvectors(sub, geometry, block_size), w)
    # and the other way round, with arbitrary subvectors
    other = torch.randn(sub.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(to_subvectors(from_subvectors(other, geometry, block_size), geometry, block_size), other)


@pytest.mark.parametrize("factory,block_size", [l[1:] for l in LAYERS], ids=[l[0] for l in LAYERS])
def test_unrolled_order_is_block_major(factory, block_size):
    """Subvector i = j * n_rows + p is block j of row (output) p."""
    module = _module(factory)
    geometry = geometry_of(module)
    w = module.weight.detach()
    sub = to_subvectors(w, geometry, block_size)
    rows = _rows_explicit(w, geometry)
    assert len(rows) == geometry.n_rows
    n_blocks = geometry.n_blocks(block_size)
    assert rows[0].numel() == n_blocks * block_size == geometry.row_length
    for j in range(n_blocks):
        for p, row in enumerate(rows):
            assert torch.equal(sub[j * geometry.n_rows + p], row[j * block_size:(j + 1) * block_size]), (j, p)


def test_d9_subvector_is_one_input_channel_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3)
    geometry = geometry_of(conv)
    sub = to_subvectors(conv.weight.detach(), geometry, 9)
    for j in range(5):          # input channel = block
        for p in range(7):      # output channel
            assert torch.equal(sub[j * 7 + p].reshape(3, 3), conv.weight.detach()[p, j])
    # d = 18: two consecutive input channels
    w6 = torch.randn(7, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    s18 = to_subvectors(w6, LayerGeometry("conv2d", (7, 6, 3, 3)), 18)
    assert torch.equal(s18[1 * 7 + 4], w6[4, 2:4].flatten())


def _reference_decode(centroids, assignments, n_blocks, weight_shape):
    """METHOD §6: centroids[assignments] (n_blocks*C_out, d) -> transpose -> split into
    n_blocks column chunks -> stack vertically -> transpose -> reshape."""
    sub = centroids[assignments]                                   # (n_blocks*C_out, d)
    t = sub.t()                                                    # (d, n_blocks*C_out)
    chunks = torch.chunk(t, n_blocks, dim=1)                       # n_blocks x (d, C_out)
    stacked = torch.cat(chunks, dim=0)                             # (n_blocks*d, C_out)
    return stacked.t().reshape(weight_shape)


@pytest.mark.parametrize("kind,shape,block_size", [
    ("conv2d", (6, 4, 3, 3), 9),
    ("conv2d", (6, 4, 3, 3), 18),
    ("conv2d", (8, 16, 1, 1), 4),
    ("conv2d", (3, 2, 5, 3), 5),
    ("linear", (10, 12), 4),
    ("linear", (10, 12), 12),
])
def test_matches_reference_reconstruction(kind, shape, block_size):
    geometry = LayerGeometry(kind, shape)
    gen = torch.Generator().manual_seed(0)
    n_centroids = 7
    centroids = torch.randn(n_centroids, block_size, generator=gen)
    n_sub = geometry.n_subvectors(block_size)
    assignments = torch.randint(n_centroids, (n_sub,), generator=gen)
    ours = from_subvectors(centroids[assignments], geometry, block_size)
    ref = _reference_decode(centroids, assignments, geometry.n_blocks(block_size), shape)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("kind,shape,groups,block_size", [
    ("conv2d", (6, 4, 3, 3), 1, 5),
    ("conv2d", (6, 4, 3, 3), 1, 0),
    ("conv2d", (6, 2, 3, 3), 2, 4),
    ("conv_transpose2d", (6, 4, 2, 2), 1, 4),
    ("linear", (10, 12), 1, 5),
])
def test_block_size_that_does_not_divide_is_an_error(kind, shape, groups, block_size):
    geometry = LayerGeometry(kind, shape, groups=groups)
    with pytest.raises(ValueError) as info:
        check_block_size(geometry, block_size, "backbone.layer1.0.conv2")
    msg = str(info.value)
    assert "backbone.layer1.0.conv2" in msg and str(tuple(shape)) in msg and f"d={block_size}" in msg
    with pytest.raises(ValueError, match="backbone.layer1.0.conv2"):
        to_subvectors(torch.zeros(shape), geometry, block_size, "backbone.layer1.0.conv2")
    with pytest.raises(ValueError, match="layer1"):
        geometry.n_subvectors(block_size, "layer1")


def test_from_subvectors_rejects_wrong_shape():
    geometry = LayerGeometry("linear", (10, 12))
    with pytest.raises(ValueError, match="fc"):
        from_subvectors(torch.zeros(29, 4), geometry, 4, "fc")


def test_geometry_of_modules_and_dict_round_trip():
    conv = nn.Conv2d(4, 6, (5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
    g = geometry_of(conv)
    assert g == LayerGeometry("conv2d", (6, 2, 5, 3), 2, (2, 1), (2, 1), (1, 2))
    assert g.n_rows == 6 and g.row_length == 30 and g.kernel_size == (5, 3)
    assert LayerGeometry.from_dict(g.to_dict()) == g
    t = geometry_of(nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2))
    assert t.kind == "conv_transpose2d" and t.n_rows == 6 * 2 * 2 and t.row_length == 4
    assert LayerGeometry.from_dict(t.to_dict()) == t
    lin = geometry_of(nn.Linear(12, 5))
    assert (lin.n_rows, lin.row_length, lin.kernel_size) == (5, 12, (1, 1))
    with pytest.raises(TypeError):
        geometry_of(nn.BatchNorm2d(3))
    with pytest.raises(ValueError):
        LayerGeometry("conv3d", (1, 1, 1, 1, 1))
    with pytest.raises(ValueError):
        LayerGeometry("linear", (1, 1, 1))


@pytest.mark.parametrize("factory,block_size", [l[1:] for l in LAYERS], ids=[l[0] for l in LAYERS])
@pytest.mark.parametrize("max_rows", [1, 7, 50, 10**6])
def test_input_rows_chunks_are_bounded_and_complete(factory, block_size, max_rows):
    module = _module(factory)
    geometry = geometry_of(module)
    gen = torch.Generator().manual_seed(3)
    if geometry.kind == "linear":
        x = torch.randn(3, 4, geometry.row_length, generator=gen)
    else:
        c_in = module.in_channels
        x = torch.randn(3, c_in, 9, 8, generator=gen)
    chunks = list(input_rows(x, geometry, max_rows))
    assert all(1 <= c.shape[0] <= max_rows for c in chunks)
    assert all(c.shape[1] == geometry.row_length for c in chunks)
    whole = torch.cat(list(input_rows(x, geometry, 10**9)))
    assert torch.equal(torch.cat(chunks), whole)


def test_input_rows_rejects_wrong_channels():
    geometry = geometry_of(nn.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="conv_a"):
        list(input_rows(torch.zeros(1, 5, 8, 8), geometry, name="conv_a"))
    with pytest.raises(ValueError, match="fc"):
        list(input_rows(torch.zeros(2, 7), geometry_of(nn.Linear(12, 5)), name="fc"))
