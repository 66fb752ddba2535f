"""What each process runs under the launcher: logging from rank 0, then the job.

    python -m launch.bootstrap <module> [args]      (started by torchrun, never by hand)

A ``moelora_dist.cli.<name>`` module (it defines ``add_arguments`` and ``main``) is run
through its own parser; any other module runs as ``__main__``. The entry point is wrapped in
torchelastic's ``record`` so that an exception on any rank is written to the error file the
launcher reads back, and the launcher's failure report names the rank and the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import runpy
import sys

from torch.distributed.elastic.multiprocessing.errors import record


def setup_logging() -> None:
    """INFO on global rank 0, WARNING elsewhere: one copy of every log line."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")


@record
def run_job(module_name: str, argv: list[str]) -> int:
    setup_logging()
    module = importlib.import_module(module_name) if module_name.startswith(
        "moelora_dist.cli.") else None
    if module is not None and hasattr(module, "add_arguments") and hasattr(module, "main"):
        parser = argparse.ArgumentParser(prog=module_name)
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv)) or 0)
    sys.argv = [module_name, *argv]
    runpy.run_module(module_name, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m launch.bootstrap MODULE [ARGS...]")
    sys.exit(run_job(sys.argv[1], sys.argv[2:]))
