"""Shared fixtures: a local Ray cluster pinned to 2 CPUs, one intra-op thread."""

import pytest
import ray
import torch


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module (``ray.init(num_cpus=2)``), always shut down."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread in this process, restored afterwards. Ray workers use one thread each,
    so in-process results (float sums) round exactly as theirs do; and on a busy 2-core machine
    two OpenMP threads spin against the workers (measured 2-9x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
