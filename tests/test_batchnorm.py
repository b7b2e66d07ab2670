"""Folded BatchNorm: detection, unfolding with an unchanged eval-mode function, channel moments."""

import copy

import pytest
import torch
from torch import nn

from bgd_dist.batchnorm import fold_batchnorm, folded_batchnorms, has_identity_statistics, unfold_batchnorm
from bgd_dist.core.stats import ChannelMoments, merge_all, stats_from_state
from bgd_dist.testing import synthetic_images, toy_convnet

BN_NAMES = ["bn1", "bn2", "bn3"]


def folded_copy(model):
    folded = copy.deepcopy(model)
    for name in BN_NAMES:
        fold_batchnorm(folded.get_submodule(name))
    return folded


@pytest.fixture(scope="module")
def models():
    teacher = toy_convnet(width=8, seed=1)
    return teacher, folded_copy(teacher), synthetic_images(torch.arange(32), 12, 0)


def example(images):
    return lambda model: model(images)


def test_folding_keeps_the_eval_function_and_detection_finds_exactly_the_folded_layers(models):
    teacher, folded, images = models
    torch.testing.assert_close(folded(images), teacher(images), rtol=1e-5, atol=1e-5)
    assert all(has_identity_statistics(folded.get_submodule(n)) for n in BN_NAMES)
    assert sorted(folded_batchnorms(folded, example(images))) == BN_NAMES
    assert folded_batchnorms(teacher, example(images)) == {}


def test_identity_statistics_of_a_normalised_input_are_not_flagged():
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()   # fresh: running mean 0, variance 1
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert folded_batchnorms(model, example(x)) == {}
    assert list(folded_batchnorms(model, example(3 * x + 2))) == ["0"]


def test_train_mode_destroys_a_folded_network_and_unfolding_repairs_it(models):
    teacher, folded, images = models
    reference = teacher(images)
    broken = copy.deepcopy(folded).train()(images)
    assert (broken - reference).abs().max() > 1.0         # batch statistics: a different function
    unfolded = copy.deepcopy(folded)
    moments = {n: ChannelMoments.empty(layer=n) for n in BN_NAMES}
    hooks = [unfolded.get_submodule(n).register_forward_pre_hook(lambda m, a, s=moments[n]: s.update(a[0]))
             for n in BN_NAMES]
    with torch.no_grad():
        unfolded(images)
    for h in hooks:
        h.remove()
    for n in BN_NAMES:
        unfold_batchnorm(unfolded.get_submodule(n), *moments[n].mean_var())
    torch.testing.assert_close(unfolded.eval()(images), reference, rtol=1e-4, atol=1e-4)   # eval function kept
    with torch.no_grad():
        train_out = copy.deepcopy(unfolded).train()(images)
    # the batch statistics of the calibration batch are now the running statistics
    torch.testing.assert_close(train_out, reference, rtol=1e-3, atol=1e-3)


def test_unfolding_refuses_a_layer_that_is_not_folded(models):
    teacher, _, _ = models
    with pytest.raises(ValueError, match="only a folded BatchNorm"):
        unfold_batchnorm(copy.deepcopy(teacher.bn1), torch.zeros(8), torch.ones(8))


def test_channel_moments_are_additive_and_survive_a_process_boundary():
    x = torch.randn(10, 4, 5, 5, generator=torch.Generator().manual_seed(3)) * 2 + 1
    whole, a, b = (ChannelMoments.empty(layer="bn") for _ in range(3))
    whole.update(x)
    a.update(x[:3])
    b.update(x[3:])
    merged = merge_all([stats_from_state(a.state()), stats_from_state(b.state())])
    mean, var = merged.mean_var()
    assert merged.count == whole.count == 10 * 25
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.double().var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="empty statistics"):
        ChannelMoments.empty(layer="bn").mean_var()
    with pytest.raises(ValueError, match="3 channels, expected 4"):
        a.update(x[:, :3])
