"""The engine's sharding rule (bgd_dist.sharding) and the adapters that follow it."""

from itertools import islice

import pytest
import torch

from bgd_dist.adapters import Adapter, Evaluator, make_adapter
from bgd_dist.config import ModelConfig
from bgd_dist.sharding import calibration_items, eval_items, item_seed, train_items
from bgd_dist.testing import synthetic_images


def test_calibration_shards_are_disjoint_and_cover_the_positions():
    parts = [calibration_items(50, i, 3, 20, seed=4) for i in range(3)]
    whole, whole_seeds = calibration_items(50, 0, 1, 20, seed=4)
    assert sum(len(i) for i, _ in parts) == 20
    for i, (idx, seeds) in enumerate(parts):
        assert torch.equal(idx, whole[i::3]) and torch.equal(seeds, whole_seeds[i::3])
    assert len(set(whole.tolist())) == 20          # fewer than available: no repeats


def test_more_images_than_exist_cycle_the_permutation_with_fresh_augmentations():
    idx, seeds = calibration_items(10, 0, 1, 25, seed=3)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, order[torch.arange(25) % 10])          # permute, then cycle
    assert seeds.tolist() == [item_seed(3, p) for p in range(25)]   # one seed per position
    assert len(set(seeds.tolist())) == 25


def test_training_step_k_depends_only_on_the_seed_and_k():
    full = list(islice(train_items(40, 1, 2, 4, seed=9), 6))
    resumed = list(islice(train_items(40, 1, 2, 4, seed=9, start_step=4), 2))
    for (a, sa), (b, sb) in zip(full[4:], resumed):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    # the union of the shards is the one-worker global batch
    one = next(train_items(40, 0, 1, 8, seed=9, start_step=4))
    two = [next(train_items(40, i, 2, 4, seed=9, start_step=4)) for i in range(2)]
    assert torch.equal(one[0], torch.cat([t[0] for t in two])) and torch.equal(one[1], torch.cat([t[1] for t in two]))
    assert not torch.equal(full[0][0], full[1][0])


def test_eval_items_subset_is_fixed_and_sorted():
    parts = [eval_items(30, i, 4, 11) for i in range(4)]
    flat = torch.cat(parts)
    assert len(set(flat.tolist())) == 11 and torch.equal(flat.sort().values, eval_items(30, 0, 1, 11))
    assert torch.equal(eval_items(30, 0, 1, None), torch.arange(30))
    with pytest.raises(ValueError, match="shard 4 of 4"):
        eval_items(30, 4, 4, None)


def toy():
    return make_adapter(ModelConfig(adapter="bgd_dist.testing:ToyAdapter", arch="toy"), {"n_images": 12})


def test_the_toy_adapter_follows_the_rule_and_resumes_its_training_stream():
    adapter = toy()
    batches = list(adapter.calibration_batches(1, 2, 30, 4, seed=5))
    idx, _ = calibration_items(12, 1, 2, 30, seed=5)
    torch.testing.assert_close(torch.cat(batches), synthetic_images(idx, 16, 0), rtol=0, atol=0)
    stream = list(islice(adapter.train_batches(0, 2, 3, seed=7), 5))
    resumed = next(adapter.train_batches(0, 2, 3, seed=7, start_step=3))
    assert torch.equal(stream[3], resumed) and not torch.equal(stream[2], stream[3])


def test_adapters_and_evaluators_declare_the_optional_hooks():
    adapter = toy()
    assert isinstance(adapter, Adapter) and isinstance(adapter.evaluator(), Evaluator)
    assert adapter.evaluator().write_results("unused.json") is None
    assert adapter.data_fingerprint() == {"n_images": 12, "image_size": 16, "seed": 0, "data_dir": None}
    model = adapter.build_model()
    adapter.set_train_mode(model, True)
    assert model.training
    adapter.set_train_mode(model, False)
    assert not model.training
