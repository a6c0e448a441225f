import os

import pytest
import torch

os.environ.setdefault("TOAP_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def faces():
    from toap_kit.data import load_faceset

    return load_faceset("lfw158", 48)


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """A test (or the code it calls) that switches autograd off globally breaks every later test
    that needs gradients, far from the cause: fail the culprit instead."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) on: scope it (torch.no_grad())"
