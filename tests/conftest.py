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
