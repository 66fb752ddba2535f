"""tests/multi_gpu run under torchrun: every process runs pytest on the same items in the same
order, so collectives line up. gloo on CPU processes, NCCL on GPUs (``$MOELORA_DIST_BACKEND``
or CUDA availability)::

    .venv/bin/torchrun --nproc-per-node 4 -m pytest tests/multi_gpu -q
    python -m launch --nproc-per-node 2 --device cuda -m pytest tests/multi_gpu -q

Outside torchrun every item is skipped, saying so. A test must run every collective before it
asserts anything, or a failing rank would leave the others waiting until the timeout.
"""

import os

import pytest
import torch

WORLD = int(os.environ.get("WORLD_SIZE", "0"))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.multi_gpu)
        if WORLD >= 8:
            item.add_marker(pytest.mark.slow)
        if "RANK" not in os.environ:
            item.add_marker(pytest.mark.skip(
                reason="needs torchrun: torchrun --nproc-per-node N -m pytest tests/multi_gpu"))


@pytest.fixture(scope="session", autouse=True)
def _destroy_groups_at_exit():
    yield
    from moelora_dist.parallel.groups import destroy_parallel

    destroy_parallel()


@pytest.fixture(scope="session")
def world() -> int:
    return WORLD


def use_cuda() -> bool:
    backend = os.environ.get("MOELORA_DIST_BACKEND")
    return backend == "nccl" or (backend is None and torch.cuda.is_available())
