"""Shared test setup."""

import pytest
import torch

import scalesearch_demo  # noqa: F401  (first: imports torchao quietly, keeps the hub offline)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, and no automatic-dynamic shapes learned from an
    earlier test's inputs."""
    torch._dynamo.reset()
    yield
