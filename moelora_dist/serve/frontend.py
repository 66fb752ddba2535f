"""The HTTP frontend process's entry point (``--frontend process``, started by serve/bridge.py):

    python -m moelora_dist.serve.frontend FD PARENT_PID < settings.json

It arms its parent-death signal before anything else (before the slow imports), so it never
outlives the engine process, even one killed by SIGKILL; then it serves (:mod:`.remote`).
"""

from __future__ import annotations

import sys

from moelora_dist.parallel.launch_env import die_with_parent


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[1]))
    from moelora_dist.serve.remote import run_frontend

    return run_frontend(int(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
