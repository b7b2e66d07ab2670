"""Additive input statistics (METHOD.md §2): the Gram metric equals the paper's ||X̃(w−c)||²."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bgd_dist.core.stats as stats_module
from bgd_dist.core.layouts import from_subvectors, geometry_of, to_subvectors
from bgd_dist.core.stats import GramStats, IdentityStats, make_stats, merge_all, stats_from_state


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _stacked_conv(x, conv, block_size):
    """X̃ for a Conv2d by explicit zero padding and slicing, (n * out_pixels * groups * n_blocks, d)."""
    n, c_in, h, w = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    g = conv.groups
    cig = c_in // g
    xp = torch.zeros(n, c_in, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for oh in range(out_h):
            for ow in range(out_w):
                for gi in range(g):
                    patch = torch.empty(cig, kh, kw, dtype=x.dtype)
                    for c in range(cig):
                        for a in range(kh):
                            for e in range(kw):
                                patch[c, a, e] = xp[b, gi * cig + c, oh * sh + a * dh, ow * sw + e * dw]
                    rows.append(patch.flatten())
    rows = torch.stack(rows)                       # (n*L*g, C_in/g*kh*kw): what one filter multiplies
    return rows.reshape(-1, block_size)             # cut every row into its blocks


def _stacked_conv_transpose(x, convt, block_size):
    """X̃ for a ConvTranspose2d from the scatter definition.

    y[b, gi*cog+o, i*s-p+a*dil, j*s-p+e*dil] += sum_c x[b, gi*cig+c, i, j] * W[gi*cig+c, o, a, e]:
    the weight vector of output column (gi, o, a, e) multiplies, for every input pixel
    (b, i, j), the input channels of group gi at that pixel.
    """
    n, c_in, h, w = x.shape
    g = convt.groups
    cig = c_in // g
    rows = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for gi in range(g):
                    rows.append(torch.stack([x[b, gi * cig + c, i, j] for c in range(cig)]))
    return torch.stack(rows).reshape(-1, block_size)


def _stacked_linear(x, block_size):
    return x.reshape(-1, x.shape[-1]).reshape(-1, block_size)


def _gram(module, x, block_size, **kwargs):
    stats = GramStats.empty(geometry_of(module), block_size, "layer", **kwargs)
    stats.update(x)
    return stats


CASES = [
    ("conv3x3", lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 5), 9),
    ("conv3x3_d18", lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 5), 18),
    ("conv1x1", lambda: nn.Conv2d(8, 6, 1), (2, 8, 5, 4), 4),
    ("conv_strided", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 6), 9),
    ("conv_dilated", lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 2, 7, 6), 6),
    ("conv_5x3", lambda: nn.Conv2d(2, 3, (5, 3), padding=(2, 0)), (1, 2, 6, 5), 5),
    ("conv_grouped", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5), 9),
    ("conv_depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3), (2, 3, 5, 5), 9),
    ("convT_2x2_s2", lambda: nn.ConvTranspose2d(8, 4, 2, stride=2), (2, 8, 3, 4), 4),
    ("convT_3x3_s2_grouped", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2), (2, 8, 3, 3), 2),
    ("linear", lambda: nn.Linear(12, 5), (7, 12), 4),
    ("linear_3d_input", lambda: nn.Linear(12, 5), (2, 3, 12), 6),
]


def _stacked(module, x, block_size):
    if isinstance(module, nn.ConvTranspose2d):
        return _stacked_conv_transpose(x, module, block_size)
    if isinstance(module, nn.Conv2d):
        return _stacked_conv(x, module, block_size)
    return _stacked_linear(x, block_size)


@pytest.mark.parametrize("factory,x_shape,block_size", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gram_metric_equals_explicit_stacked_activations(factory, x_shape, block_size):
    torch.manual_seed(0)
    module = factory().double()
    x = torch.randn(x_shape, dtype=torch.float64, generator=_gen(1))
    stats = _gram(module, x, block_size)
    x_tilde = _stacked(module, x, block_size)                      # (n * n_blocks, d), built by hand
    assert stats.n_rows == x_tilde.shape[0]
    gram = stats.gram
    torch.testing.assert_close(gram, x_tilde.T @ x_tilde, rtol=1e-9, atol=1e-9 * float(gram.abs().max()))
    gen = _gen(2)
    for _ in range(5):
        w = torch.randn(block_size, dtype=torch.float64, generator=gen)
        c = torch.randn(block_size, dtype=torch.float64, generator=gen)
        explicit = float((x_tilde @ (w - c)).pow(2).sum())
        via_gram = float((w - c) @ gram @ (w - c))
        assert via_gram == pytest.approx(explicit, rel=1e-9)
    # metric() is the Gram normalised by the number of d-rows (same argmin)
    torch.testing.assert_close(stats.metric(), gram / x_tilde.shape[0], rtol=0, atol=0)


def _quantized_copy(weight, geometry, block_size, seed=5):
    """A 'decoded' weight: every subvector replaced by a perturbed copy."""
    sub = to_subvectors(weight, geometry, block_size)
    noise = 0.1 * torch.randn(sub.shape, dtype=sub.dtype, generator=_gen(seed))
    return from_subvectors(sub + noise, geometry, block_size)


def _summed_distance(weight, w_hat, geometry, block_size, gram):
    diff = to_subvectors(weight - w_hat, geometry, block_size)
    return float(((diff @ gram) * diff).sum())


@pytest.mark.parametrize("factory,x_shape", [
    (lambda: nn.Conv2d(6, 5, 1), (2, 6, 5, 4)),
    (lambda: nn.Conv2d(6, 5, 1, stride=2), (2, 6, 5, 4)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2), (2, 4, 7, 6)),
    (lambda: nn.Linear(12, 5), (9, 12)),
])
def test_single_block_distance_is_the_true_output_error(factory, x_shape):
    """With one block per row (d = row length) no cross-term is dropped:
    Σ_outputs (w−ŵ)ᵀ G (w−ŵ) = ||f(x, W) − f(x, Ŵ)||².
    (Grouped convs are excluded on purpose: their groups share one pooled metric,
    like block positions do, so the identity holds only per group.)"""
    torch.manual_seed(0)
    module = factory().double()
    geometry = geometry_of(module)
    block_size = geometry.row_length
    x = torch.randn(x_shape, dtype=torch.float64, generator=_gen(1))
    gram = _gram(module, x, block_size).gram
    weight = module.weight.detach()
    w_hat = _quantized_copy(weight, geometry, block_size)
    if geometry.kind == "linear":
        err = (F.linear(x, weight) - F.linear(x, w_hat)).pow(2).sum()
    else:
        kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        err = (F.conv2d(x, weight, **kw) - F.conv2d(x, w_hat, **kw)).pow(2).sum()
    assert _summed_distance(weight, w_hat, geometry, block_size, gram) == pytest.approx(float(err), rel=1e-10)


def test_conv_transpose_stride_equal_kernel_is_a_per_pixel_linear():
    """Mask R-CNN conv5_mask: stride == kernel, every output pixel gets one contribution,
    so with d = C_in the metric gives the exact output error."""
    groups = 1
    torch.manual_seed(0)
    convt = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=groups).double()
    geometry = geometry_of(convt)
    block_size = geometry.row_length
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=_gen(1))
    gram = _gram(convt, x, block_size).gram
    weight = convt.weight.detach()
    w_hat = _quantized_copy(weight, geometry, block_size)
    err = (F.conv_transpose2d(x, weight, stride=2, groups=groups)
           - F.conv_transpose2d(x, w_hat, stride=2, groups=groups)).pow(2).sum()
    assert _summed_distance(weight, w_hat, geometry, block_size, gram) == pytest.approx(float(err), rel=1e-10)
    # with smaller blocks the simplification drops cross-terms: the numbers differ
    small = _gram(convt, x, 2).gram
    assert _summed_distance(weight, w_hat, geometry, 2, small) != pytest.approx(float(err), rel=1e-3)


def test_streaming_equals_one_batch_and_shards_merge():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    geometry = geometry_of(conv)
    x = torch.randn(10, 4, 9, 7, dtype=torch.float64, generator=_gen(1))
    whole = GramStats.empty(geometry, 9, "conv")
    whole.update(x)
    streamed = GramStats.empty(geometry, 9, "conv")
    for xb in x.split(3):
        streamed.update(xb)
    torch.testing.assert_close(streamed.gram, whole.gram, rtol=1e-12, atol=0)
    assert (streamed.n_rows, streamed.n_inputs) == (whole.n_rows, whole.n_inputs)
    assert whole.n_inputs == 10 * 5 * 4 and whole.n_rows == whole.n_inputs * 4

    shard_a = GramStats.empty(geometry, 9, "conv")
    shard_a.update(x[:4])
    shard_b = GramStats.empty(geometry, 9, "conv")
    shard_b.update(x[4:])
    merged = shard_a.merge(shard_b)
    torch.testing.assert_close(merged.gram, whole.gram, rtol=1e-12, atol=0)
    assert (merged.n_rows, merged.n_inputs) == (whole.n_rows, whole.n_inputs)
    torch.testing.assert_close(merge_all([shard_a, shard_b]).metric(), whole.metric(), rtol=1e-12, atol=0)
    # merge does not mutate its operands
    assert shard_a.n_rows == whole.n_rows * 4 // 10

    # deterministic: the same input gives bit-identical statistics
    again = GramStats.empty(geometry, 9, "conv")
    again.update(x)
    assert torch.equal(again.gram, whole.gram)

    # state round trip (what crosses process boundaries)
    restored = stats_from_state(whole.state())
    assert torch.equal(restored.gram, whole.gram) and restored.n_rows == whole.n_rows
    assert restored.geometry == geometry and restored.layer == "conv"


@pytest.mark.parametrize("factory,x_shape,block_size,max_rows", [
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 8, 8), 9, 40),       # one image = 64 rows > 40: banded
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4, 8, 8), 9, 5),
    (lambda: nn.Conv2d(4, 6, 1), (5, 4, 8, 8), 4, 200),                 # several images per chunk
    (lambda: nn.ConvTranspose2d(8, 4, 2, stride=2), (5, 8, 6, 6), 4, 20),
    (lambda: nn.Linear(12, 5), (50, 12), 4, 8),
])
def test_update_uses_bounded_chunks(monkeypatch, factory, x_shape, block_size, max_rows):
    torch.manual_seed(0)
    module = factory()
    x = torch.randn(x_shape, generator=_gen(1))
    seen = []
    original = stats_module.input_rows

    def recording(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            seen.append(chunk.shape[0])
            yield chunk

    monkeypatch.setattr(stats_module, "input_rows", recording)
    bounded = _gram(module, x, block_size, max_rows=max_rows)
    assert seen and max(seen) <= max_rows
    monkeypatch.setattr(stats_module, "input_rows", original)
    unbounded = _gram(module, x, block_size, max_rows=10**9)
    torch.testing.assert_close(bounded.gram, unbounded.gram, rtol=1e-12, atol=1e-12)
    assert bounded.n_rows == unbounded.n_rows


def test_state_size_does_not_grow_with_images():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    small = _gram(conv, torch.randn(1, 4, 8, 8, generator=_gen(1)), 9)
    large = _gram(conv, torch.randn(40, 4, 8, 8, generator=_gen(1)), 9)
    assert small.nbytes == large.nbytes == 9 * 9 * 8
    assert large.n_inputs == 40 * small.n_inputs


def test_non_finite_input_names_the_layer():
    stats = GramStats.empty(geometry_of(nn.Conv2d(4, 6, 3)), 9, "layer2.1.conv2")
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer2\.1\.conv2"):
        stats.update(x)
    x[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"layer2\.1\.conv2"):
        stats.update(x)
    assert stats.n_rows == 0


def test_empty_statistics_name_the_layer():
    stats = make_stats("gram", geometry_of(nn.Linear(12, 5)), 4, "fc")
    with pytest.raises(ValueError, match="fc.*empty"):
        stats.metric()


def test_merge_rejects_other_layers_and_unknown_types():
    a = GramStats.empty(geometry_of(nn.Linear(12, 5)), 4, "fc")
    with pytest.raises(ValueError, match="fc"):
        a.merge(GramStats.empty(geometry_of(nn.Linear(12, 5)), 6, "fc"))
    with pytest.raises(ValueError, match="fc"):
        a.merge(GramStats.empty(geometry_of(nn.Linear(12, 6)), 4, "fc"))
    with pytest.raises(ValueError, match="fc"):
        make_stats("unknown", geometry_of(nn.Linear(12, 5)), 4, "fc")
    with pytest.raises(ValueError, match="fc"):
        make_stats("gram", geometry_of(nn.Linear(12, 5)), 5, "fc")
    with pytest.raises(ValueError):
        merge_all([])


def test_identity_statistics_are_the_weights_only_baseline():
    stats = make_stats("identity", geometry_of(nn.Conv2d(4, 6, 3)), 9, "conv")
    assert isinstance(stats, IdentityStats)
    stats.update(torch.randn(1, 4, 5, 5))
    assert torch.equal(stats.metric(), torch.eye(9, dtype=torch.float64))
    restored = stats_from_state(stats.merge(stats).state())
    assert isinstance(restored, IdentityStats) and restored.block_size == 9


def test_the_pooled_gram_of_a_smaller_block_size_follows_from_a_larger_one():
    # what the allocation relies on: the Gram at D gives the Gram of every d dividing D
    from bgd_dist.core.hessian import pooled_metric

    g = geometry_of(nn.Conv2d(8, 4, 3, padding=1))       # row length 72
    x = torch.randn(5, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    big = GramStats.empty(g, 36, "c")
    big.update(x)
    for d in (4, 9, 12, 36):
        small = GramStats.empty(g, d, "c")
        small.update(x)
        torch.testing.assert_close(pooled_metric(big.metric(), d), small.metric(), rtol=1e-12, atol=1e-12)
