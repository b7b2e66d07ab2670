"""Quantized modules (METHOD.md §4): exact forward, mean centroid gradients that survive pickling."""

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgd_dist.core.kmeans import Codebook, fit_codebook
from bgd_dist.core.layouts import geometry_of, to_subvectors
from bgd_dist.nn.modules import (
    PQConv2d,
    PQConvTranspose2d,
    PQLayer,
    PQLinear,
    dense_layer,
    dequantize_,
    pq_layers,
    quantize_,
    quantized_from_dense,
    set_weight_cache,
)
from bgd_dist.plan import Rule, build_plan


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (id, dense factory, block size, n_centroids, input shape)
LAYERS = [
    ("conv3x3", lambda: nn.Conv2d(4, 6, 3, padding=1), 9, 5, (2, 4, 7, 6)),
    ("conv_strided_grouped", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), 9, 4, (2, 4, 7, 6)),
    ("conv1x1_nobias", lambda: nn.Conv2d(8, 6, 1, bias=False), 4, 3, (2, 8, 5, 5)),
    ("conv_reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), 9, 5, (2, 4, 6, 6)),
    ("convT_2x2_s2", lambda: nn.ConvTranspose2d(8, 4, 2, stride=2), 4, 6, (2, 8, 3, 4)),
    ("convT_3x3_grouped", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1,
                                                     groups=2), 2, 5, (2, 8, 3, 3)),
    ("linear", lambda: nn.Linear(12, 5), 4, 6, (3, 12)),
    ("linear_3d", lambda: nn.Linear(12, 5), 6, 4, (2, 3, 12)),
]
IDS = [l[0] for l in LAYERS]


def _random_codebook(geometry, block_size, n_centroids, seed=0):
    gen = _gen(seed)
    centroids = torch.randn(n_centroids, block_size, generator=gen)
    assignments = torch.randint(n_centroids, (geometry.n_subvectors(block_size),), generator=gen)
    assignments[:n_centroids] = torch.arange(n_centroids)          # every centroid used
    return Codebook(centroids, assignments, ())


def _make(factory, block_size, n_centroids, seed=0):
    torch.manual_seed(seed)
    dense = factory()
    codebook = _random_codebook(geometry_of(dense), block_size, n_centroids, seed)
    return dense, codebook, quantized_from_dense(dense, codebook, "layer")


def _functional(dense, x, weight):
    if isinstance(dense, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, dense.bias, dense.stride, dense.padding, dense.output_padding,
                                  dense.groups, dense.dilation)
    if isinstance(dense, nn.Conv2d):
        if dense.padding_mode != "zeros":
            return dense._conv_forward(x, weight, dense.bias)
        return F.conv2d(x, weight, dense.bias, dense.stride, dense.padding, dense.dilation, dense.groups)
    return F.linear(x, weight, dense.bias)


@pytest.mark.parametrize("factory,block_size,n_centroids,x_shape", [l[1:] for l in LAYERS], ids=IDS)
def test_forward_equals_dense_with_decoded_weight(factory, block_size, n_centroids, x_shape):
    dense, codebook, q = _make(factory, block_size, n_centroids)
    expected_type = {nn.Conv2d: PQConv2d, nn.ConvTranspose2d: PQConvTranspose2d, nn.Linear: PQLinear}[type(dense)]
    assert type(q) is expected_type
    decoded = codebook.decode(geometry_of(dense))
    assert torch.equal(q.weight, decoded)
    x = torch.randn(x_shape, generator=_gen(1))
    out = q(x)
    assert torch.equal(out, _functional(dense, x, decoded))
    # bias untouched (a copy, same values)
    if dense.bias is None:
        assert q.bias is None
    else:
        assert torch.equal(q.bias, dense.bias) and q.bias.data_ptr() != dense.bias.data_ptr()
    # the dense module with the decoded weight copied in computes the same thing, bit for bit
    with torch.no_grad():
        dense.weight.copy_(decoded)
    assert torch.equal(out, dense(x))


def _expected_mean_grad(dense, q, x, upstream):
    """Gradient of each centroid = mean of the gradients of its assigned subvectors, from a
    dense weight with requires_grad."""
    geometry = q.geometry
    weight = q.weight.detach().clone().requires_grad_(True)
    (_functional(dense, x, weight) * upstream).sum().backward()
    sub_grad = to_subvectors(weight.grad, geometry, q.block_size)
    expected = torch.zeros_like(q.centroids)
    for c in range(q.n_centroids):
        members = sub_grad[q.assignments == c]
        if members.shape[0]:
            expected[c] = members.mean(0)
    return expected


def _centroid_grad(q, x, upstream):
    q.zero_grad()
    (q(x) * upstream).sum().backward()
    return q.centroids.grad.clone()


@pytest.mark.parametrize("factory,block_size,n_centroids,x_shape", [l[1:] for l in LAYERS], ids=IDS)
def test_centroid_gradient_is_the_mean(factory, block_size, n_centroids, x_shape):
    dense, codebook, q = _make(factory, block_size, n_centroids)
    x = torch.randn(x_shape, generator=_gen(1))
    upstream = torch.randn(q(x).shape, generator=_gen(2))
    grad = _centroid_grad(q, x, upstream)
    expected = _expected_mean_grad(dense, q, x, upstream)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    # not the sum: the sum differs by the cluster sizes
    counts = torch.bincount(q.assignments, minlength=q.n_centroids)
    assert counts.max() > 1
    assert not torch.allclose(grad, expected * counts.unsqueeze(1), rtol=1e-3, atol=1e-6)
    if q.bias is not None:
        assert q.bias.grad is not None


def test_unused_centroid_gets_zero_gradient():
    torch.manual_seed(0)
    dense = nn.Linear(8, 3)
    codebook = Codebook(torch.randn(4, 4), torch.tensor([0, 1, 0, 1, 0, 2]), ())
    q = quantized_from_dense(dense, codebook)
    (q(torch.randn(2, 8)) ** 2).sum().backward()
    assert torch.equal(q.centroids.grad[3], torch.zeros(4))


@pytest.mark.parametrize("clone", ["pickle", "deepcopy"])
@pytest.mark.parametrize("index", [0, 4, 6])
def test_mean_gradient_survives_serialization(clone, index):
    factory, block_size, n_centroids, x_shape = LAYERS[index][1:]
    dense, codebook, q = _make(factory, block_size, n_centroids)
    q2 = pickle.loads(pickle.dumps(q)) if clone == "pickle" else copy.deepcopy(q)
    assert type(q2) is type(q) and q2 is not q
    x = torch.randn(x_shape, generator=_gen(1))
    upstream = torch.randn(q(x).shape, generator=_gen(2))
    assert torch.equal(q2(x), q(x))
    expected = _expected_mean_grad(dense, q2, x, upstream)
    torch.testing.assert_close(_centroid_grad(q2, x, upstream), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_centroid_grad(q2, x, upstream), _centroid_grad(q, x, upstream))


def test_module_pickled_with_optimizer_step_stays_representable():
    """After an SGD step every subvector of a centroid still equals that centroid."""
    dense, codebook, q = _make(LAYERS[0][1], 9, 5)
    q = pickle.loads(pickle.dumps(q))
    opt = torch.optim.SGD(q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2, 4, 7, 6, generator=_gen(1))
    for _ in range(2):
        opt.zero_grad()
        q(x).pow(2).mean().backward()
        opt.step()
    sub = to_subvectors(q.weight.detach(), q.geometry, 9)
    assert torch.equal(sub, q.centroids.detach()[q.assignments])


@pytest.mark.parametrize("factory,block_size,n_centroids,x_shape", [l[1:] for l in LAYERS], ids=IDS)
def test_state_dict_round_trip(factory, block_size, n_centroids, x_shape):
    dense, codebook, q = _make(factory, block_size, n_centroids, seed=0)
    _, _, fresh = _make(factory, block_size, n_centroids, seed=1)
    state = q.state_dict()
    assert set(state) == {"centroids", "assignments"} | ({"bias"} if q.bias is not None else set())
    fresh.load_state_dict(state)
    x = torch.randn(x_shape, generator=_gen(1))
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.counts, torch.bincount(q.assignments, minlength=n_centroids))
    upstream = torch.randn(q(x).shape, generator=_gen(2))
    torch.testing.assert_close(_centroid_grad(fresh, x, upstream), _centroid_grad(q, x, upstream))


def test_assignments_out_of_range_are_errors():
    dense = nn.Conv2d(4, 6, 3)
    geometry = geometry_of(dense)
    n_sub = geometry.n_subvectors(9)
    centroids = torch.randn(4, 9)
    for bad in (4, -1):
        assignments = torch.zeros(n_sub, dtype=torch.long)
        assignments[3] = bad
        with pytest.raises(ValueError, match="conv_a.*range"):
            PQConv2d(geometry, centroids, assignments, None, name="conv_a")
    with pytest.raises(ValueError, match="conv_a"):
        PQConv2d(geometry, centroids, torch.zeros(n_sub - 1, dtype=torch.long), None, name="conv_a")
    q = PQConv2d(geometry, centroids, torch.zeros(n_sub, dtype=torch.long), None, name="conv_a")
    state = q.state_dict()
    state["assignments"] = state["assignments"].clone()
    state["assignments"][0] = 9
    with pytest.raises(ValueError, match="conv_a.*range"):
        q.load_state_dict(state)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 4, 3, padding=1),
        relu=nn.ReLU(),
        body=nn.Sequential(OrderedDict(
            conv=nn.Conv2d(4, 8, 3, stride=2, padding=1),
            up=nn.ConvTranspose2d(8, 8, 2, stride=2),
            proj=nn.Conv2d(8, 2, 1),
        )),
        pool=nn.AdaptiveAvgPool2d(4),
        head=_Head(),
    ))


RULES = [
    Rule(match="stem", skip=True),
    Rule(match=r"body\.up", block_size=4),
    Rule(match=r".*", kind="conv2d", kernel=(3, 3), block_size=9),
    Rule(match=r".*", kind="conv2d", kernel=(1, 1), block_size=4),
    Rule(match=r"head\.fc", block_size=4, n_centroids=8),
]


def _plan_and_codebooks(model, x):
    plan = build_plan(model, RULES, run=lambda m: m(x), default_n_centroids=256)
    codebooks = {}
    for entry in plan.quantized:
        weight = model.get_submodule(entry.name).weight.detach()
        codebooks[entry.name] = fit_codebook(weight, entry.geometry, None, entry.n_centroids, entry.block_size,
                                             n_iter=5, seed=0, name=entry.name)
    return plan, codebooks


def test_quantize_swaps_by_qualified_name():
    model = _tiny_model()
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    plan, codebooks = _plan_and_codebooks(model, x)
    assert set(codebooks) == {"body.conv", "body.up", "body.proj", "head.fc"}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, cb in codebooks.items():
            reference.get_submodule(name).weight.copy_(cb.decode(plan.layer(name).geometry))
    stem = model.stem
    quantize_(model, plan, codebooks)
    assert model.stem is stem and type(model.stem) is nn.Conv2d           # skipped layer untouched
    assert isinstance(model.body.conv, PQConv2d) and isinstance(model.body.up, PQConvTranspose2d)
    assert isinstance(model.body.proj, PQConv2d) and isinstance(model.head.fc, PQLinear)
    assert set(pq_layers(model)) == set(codebooks)
    assert model.head.fc.n_centroids == 8 and model.body.conv.layer_name == "body.conv"
    assert torch.equal(model(x), reference(x))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, plan, {"body.conv": codebooks["body.conv"]})


def test_quantize_checks_the_plan():
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    plan, codebooks = _plan_and_codebooks(_tiny_model(), x)
    # geometry mismatch: same names, different stride
    other = _tiny_model()
    other.body.conv = nn.Conv2d(4, 8, 3, stride=1, padding=1)
    with pytest.raises(ValueError, match="body.conv.*geometry"):
        quantize_(other, plan, codebooks)
    assert type(other.body.proj) is nn.Conv2d                              # nothing swapped
    # block size mismatch
    bad = dict(codebooks, **{"head.fc": Codebook(torch.randn(8, 8), torch.zeros(40, dtype=torch.long), ())})
    with pytest.raises(ValueError, match="head.fc.*block size"):
        quantize_(_tiny_model(), plan, bad)
    # a skipped layer or an unknown layer
    stem_cb = Codebook(torch.randn(4, 9), torch.zeros(12, dtype=torch.long), ())
    with pytest.raises(ValueError, match="stem"):
        quantize_(_tiny_model(), plan, {"stem": stem_cb})
    with pytest.raises(KeyError, match="nope"):
        quantize_(_tiny_model(), plan, {"nope": stem_cb})


def test_quantized_module_follows_the_dense_dtype():
    torch.manual_seed(0)
    dense = nn.Linear(12, 5).double()
    codebook = _random_codebook(geometry_of(dense), 4, 3)
    q = quantized_from_dense(dense, codebook)
    assert q.centroids.dtype == torch.float64 and q.assignments.dtype == torch.int64
    x = torch.randn(2, 12, dtype=torch.float64)
    assert torch.equal(q(x), F.linear(x, codebook.decode(q.geometry).double(), dense.bias))
    assert isinstance(q, PQLayer) and q.codebook().n_centroids == 3


# ----------------------------------------------------------------------------- inference: the decoded-weight cache

def _counting(layer):
    """Count the layer's decodes."""
    calls = []
    decode = layer.decode

    def counted():
        calls.append(1)
        return decode()

    layer.decode = counted
    return calls


def _fresh(layer, x):
    """The output with a freshly decoded weight."""
    with torch.no_grad():
        return _functional(dense_layer(layer), x, layer.decode())


@pytest.mark.parametrize("factory,block_size,n_centroids,x_shape", [l[1:] for l in LAYERS], ids=IDS)
def test_eval_inference_decodes_once_and_matches(factory, block_size, n_centroids, x_shape):
    dense, codebook, q = _make(factory, block_size, n_centroids)
    x = torch.randn(x_shape, generator=_gen(1))
    expected = _functional(dense, x, codebook.decode(geometry_of(dense)))
    q.eval()
    calls = _counting(q)
    with torch.no_grad():
        outs = [q(x) for _ in range(3)]
    assert len(calls) == 1
    for out in outs:
        assert torch.equal(out, expected)
    # dense_layer: the plain layer it replaced, same outputs
    plain = dense_layer(q)
    assert type(plain) is type(dense) and set(plain.state_dict()) == set(dense.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def test_cache_is_never_stale():
    dense, codebook, q = _make(lambda: nn.Conv2d(4, 6, 3, padding=1), 9, 5)
    x = torch.randn(2, 4, 7, 6, generator=_gen(1))
    q.eval()
    calls = _counting(q)

    def check(expect_decode: bool):
        before = len(calls)
        xq = x.to(q.centroids.dtype)
        with torch.no_grad():
            out = q(xq)
        assert len(calls) == before + int(expect_decode)
        assert torch.equal(out, _fresh(q, xq))
        return out

    first = check(True)
    check(False)
    with torch.no_grad():                                    # in-place change of the centroids
        q.centroids.mul_(2)
    assert not torch.equal(check(True), first)
    with torch.no_grad():                                    # in-place change of the assignments
        q.assignments.copy_(torch.roll(q.assignments, 1))
    check(True)
    other = copy.deepcopy(q.state_dict())
    other["centroids"] = other["centroids"] + 1
    q.load_state_dict(other)                                 # load_state_dict
    check(True)
    q.train().eval()                                         # train() drops it
    check(True)
    optimizer = torch.optim.SGD([q.centroids], lr=0.5)       # an optimizer step
    q.centroids.grad = torch.ones_like(q.centroids)
    optimizer.step()
    check(True)
    q.double()                                               # .to(dtype)
    out = check(True)
    assert out.dtype == torch.float64
    q.centroids.data = q.centroids.data + 1                  # .data bypasses the version counter ...
    q.clear_cache()                                          # ... clear_cache() is the remedy
    check(True)


def test_memory_lean_mode_decodes_per_call():
    _, _, q = _make(lambda: nn.Linear(12, 5), 4, 6)
    model = nn.Sequential(q).eval()
    set_weight_cache(model, False)
    calls = _counting(q)
    x = torch.randn(3, 12, generator=_gen(1))
    with torch.no_grad():
        a, b = model(x), model(x)
    assert len(calls) == 2 and torch.equal(a, b) and q._cache is None
    set_weight_cache(model, True)
    with torch.no_grad():
        assert torch.equal(model(x), a) and torch.equal(model(x), a)
    assert len(calls) == 3


def test_gradients_flow_whenever_they_can_reach_the_centroids():
    """Training and eval-mode distillation (the detection adapter distils in eval mode) decode per
    call through the mean-gradient function; a frozen model still passes gradients to its input."""
    dense, codebook, q = _make(lambda: nn.Conv2d(4, 6, 3, padding=1), 9, 5)
    x = torch.randn(2, 4, 7, 6, generator=_gen(1))
    for mode in (True, False):
        q.train(mode)
        q.centroids.grad = None
        q(x).square().sum().backward()
        assert q.centroids.grad is not None and q.centroids.grad.abs().sum() > 0
        assert q._cache is None
    with torch.no_grad():
        q(x)                                                  # warm the cache
    q.centroids.requires_grad_(False)
    xi = x.clone().requires_grad_(True)
    q(xi).sum().backward()                                    # the cached weight meets autograd
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    with torch.inference_mode():
        q.centroids.requires_grad_(True)
        out = q(x)
    assert torch.equal(out, _fresh(q, x))


def test_cache_is_not_pickled():
    _, _, q = _make(lambda: nn.Linear(64, 32), 4, 6)
    size = len(pickle.dumps(q.eval()))
    with torch.no_grad():
        q(torch.randn(3, 64))
    assert q._cache is not None
    assert len(pickle.dumps(q)) == size
    assert pickle.loads(pickle.dumps(q))._cache is None and copy.deepcopy(q)._cache is None


def test_dequantize_gives_the_original_architecture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    plan = build_plan(model, [Rule(r"0", block_size=9, n_centroids=4), Rule(r"3", block_size=4, n_centroids=8)],
                      run=lambda m: m(torch.zeros(1, 3, 6, 6)))
    codebooks = {l.name: _random_codebook(l.geometry, l.block_size, l.n_centroids) for l in plan.quantized}
    quantize_(model, plan, codebooks)
    x = torch.randn(2, 3, 6, 6, generator=_gen(2))
    with torch.no_grad():
        expected = model(x)
    dequantize_(model)
    assert not pq_layers(model) and [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
