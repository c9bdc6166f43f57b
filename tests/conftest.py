import os
from pathlib import Path

import pytest
import torch

SHARED_MESHES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "meshes"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds wake-up latency, which on an oversubscribed machine can turn the
    thousands of small ops of a gradcheck into minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_meshes():
    """The real third-party meshes beside the repository (skips when absent)."""
    root = Path(os.environ.get("SPARSEFLEX_SHARED_MESHES", SHARED_MESHES))
    if not root.is_dir():
        pytest.skip(f"shared meshes not found at {root}")
    return root
