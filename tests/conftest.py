"""Test setup: the Triton interpreter on CPU-only machines, hypothesis profiles, the ``gpu`` marker.

TRITON_INTERPRET must be set before any Triton kernel is defined, hence here, before imports.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter takes about a second per small call: few examples, no deadline; CI draws the
# same examples every run (derandomize), the GPU profile explores new ones each run.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# On the GPU most examples compile new kernel variants (head dims, dtype, biases, specialisations:
# several seconds each), so the profile keeps to what a test run can afford.
settings.register_profile("gpu", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# One of several pytest processes run side by side (each draws its own examples): a single
# hypothesis test does not spread over pytest-xdist workers, and its compilations are CPU-bound.
settings.register_profile("gpu-shard", max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def release_cached_cuda_memory(request):
    """Under pytest-xdist every worker's caching allocator keeps what its earlier tests freed, so the
    workers together can starve one test on a shared card: each ``gpu`` test hands its freed blocks back."""
    yield
    if HAS_CUDA and "gpu" in request.keywords and os.environ.get("PYTEST_XDIST_WORKER"):
        torch.cuda.empty_cache()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A finished tiny synthetic training run (tests/tiny_run.py), trained once per session."""
    from tiny_run import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_run_dir, tmp_path_factory):
    """The tiny run's export folder."""
    from hstu.export import export_run

    return export_run(tiny_run_dir, tmp_path_factory.mktemp("tiny-exports") / "export")
