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


@pytest.fixture(scope="session")
def shared_meshes():
    """The real third-party meshes beside the repository (skips when absent)."""
    root = Path(os.environ.get("SPARSEFLEX_SHARED_MESHES", SHARED_MESHES))
    if not root.is_dir():
        pytest.skip(f"shared meshes not found at {root}")
    return root


CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """A test taking ``device`` runs on the CPU, and on CUDA too when one is available (skipped otherwise)."""
    return torch.device(request.param)
