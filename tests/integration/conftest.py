"""tests/integration: the launcher run as subprocesses (gloo CPU processes, loopback only).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration -q
    .venv/bin/python -m pytest -m integration          # the same tests by marker

Every test here is marked ``integration``. Triton kernels run in the interpreter (chosen before
anything imports triton, and inherited by the launched processes).
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.integration)
