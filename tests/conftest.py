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


@pytest.fixture
def spawn_ranks():
    """``run(worker, *args, world=2)``: ``worker(rank, world, *args, queue)`` in ``world`` spawned processes (a
    DDP group of CPU processes); returns what each put on the queue, in arrival order, once all exited cleanly."""
    import torch.multiprocessing as mp

    def run(worker, *args, world: int = 2, timeout: float = 300) -> list:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, world, *args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=timeout) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return got

    return run
