"""Peak memory of this process, the figure every report and benchmark prints."""

from __future__ import annotations

import resource

import torch


def peak_memory_bytes(device=None) -> int:
    """Peak memory so far: CUDA's peak allocation on a CUDA device, otherwise the peak resident set size.

    On Linux that is VmHWM, which starts afresh at exec; ``ru_maxrss`` keeps the parent's peak across a fork, so a
    child of a large parent would report the parent's.
    """
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux (macOS gives bytes)
