"""Shared test setup."""

import os

import pytest
import torch

# torchao prints two lines about its CUDA-only extensions on a CPU machine unless told to skip them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, and no automatic-dynamic shapes learned from an
    earlier test's inputs."""
    torch._dynamo.reset()
    yield
