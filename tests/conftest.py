"""Shared test setup."""

import pytest
import torch
from hypothesis import settings

import scalesearch_demo  # noqa: F401  (first: imports torchao quietly, keeps the hub offline)

# Property tests run the same examples every time ("ci", loaded here); --hypothesis-profile=long (loaded by
# hypothesis after this file) runs 10,000 examples a test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("long", max_examples=10_000)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, and no automatic-dynamic shapes learned from an
    earlier test's inputs."""
    torch._dynamo.reset()
    yield


HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal")


@pytest.fixture
def host_reads():
    """``host_reads(fn)``: the ops ``fn()`` runs that read a tensor's value on the host, each a GPU
    synchronisation on CUDA (and a failure under CUDA-graph capture). Counted with the profiler, which also
    sees inside custom ops."""

    def count(fn) -> list[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            fn()
        return [event.name for event in profile.events() if event.name in HOST_READS]

    return count
