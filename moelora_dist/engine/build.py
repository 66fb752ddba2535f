"""Process groups for an engine: one process, or the layout under torchrun / the launcher."""

from __future__ import annotations

import os

import torch

from moelora_dist.errors import OptionError
from moelora_dist.parallel.groups import ParallelGroups, init_parallel
from moelora_dist.parallel.layout import LayoutError


def make_groups(tp: int = 1, ep: int = 1, device=None) -> ParallelGroups:
    """``ParallelGroups`` of ``(tp, ep)``: a single process when not launched (``tp == ep ==
    1``), else the torchrun environment's groups (gloo on CPU, NCCL on CUDA)."""
    kind = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionError("device cuda but torch sees no CUDA device; use device='cpu'")
    if "RANK" not in os.environ:
        if tp != 1 or ep != 1:
            raise LayoutError(f"tp={tp} ep={ep} needs {tp} processes; run under "
                              f"`python -m launch --nproc-per-node {tp} ...` or torchrun")
        return ParallelGroups.single(torch.device("cuda", torch.cuda.current_device())
                                     if kind == "cuda" else "cpu")
    return init_parallel(tp, ep, backend="gloo" if kind == "cpu" else "nccl")
