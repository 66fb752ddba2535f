"""Tiny jobs for the launcher tests, run on every rank under the launcher.

    python -m launch --nproc-per-node 2 --device cpu -m tests.integration.fake_job MODE [ARGS]

Modes (each does one thing the tests check from outside):

- ``user-error``: every rank raises a ``MoeloraError`` (left to the launcher's bootstrap);
- ``report-user-error``: every rank reports one with ``report_user_error`` and exits 2, as the
  ``moelora-dist`` commands do;
- ``exit RANK CODE``: rank RANK exits with CODE, the others wait in a collective;
- ``crash RANK``: rank RANK raises a ``RuntimeError`` (a bug: traceback kept);
- ``stall GROUP RANK``: layout tp=4, ep=2 (world 4); rank RANK sleeps while the others
  all-reduce on GROUP (tp, ep or moe_tp) and must time out;
- ``sleep DIR``: every rank writes its pid to ``DIR/pid<RANK>`` and sleeps forever;
- ``heartbeat DIR``: every rank writes its pid to ``DIR/pid<RANK>``, then world all-reduces
  forever, 0.2 s apart, checking every sum; rank 0 writes ``DIR/ready`` after the first one;
- ``env DIR``: every rank all-reduces once and writes ``DIR/env<RANK>.json`` (its network
  variables, ``LOCAL_WORLD_SIZE``, the all-reduce sum).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from moelora_dist.errors import MoeloraError, report_user_error
from moelora_dist.parallel.groups import destroy_parallel, init_parallel
from moelora_dist.parallel.launch_env import network_env

USER_MESSAGE = "the widget file /nowhere/widget.json is missing; write one with make-widget"
RANK = int(os.environ.get("RANK", "0"))


def _world():
    world = int(os.environ["WORLD_SIZE"])
    return init_parallel(world, 1)


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "user-error":
        raise MoeloraError(USER_MESSAGE)
    if mode == "report-user-error":
        return report_user_error("fake-job", MoeloraError(USER_MESSAGE))
    if mode in ("sleep", "heartbeat"):
        with open(os.path.join(args[0], f"pid{RANK}"), "w") as fh:
            fh.write(str(os.getpid()))
    if mode == "sleep":
        while True:
            time.sleep(60)
    try:
        if mode == "exit":
            g = _world()
            if g.rank == int(args[0]):
                return int(args[1])
            dist.all_reduce(torch.ones(1), group=g.tp_group)  # waits for the rank that left
            time.sleep(120)
        elif mode == "crash":
            g = _world()
            if g.rank == int(args[0]):
                raise RuntimeError(f"boom on purpose from rank {g.rank}")
            dist.all_reduce(torch.ones(1), group=g.tp_group)
            time.sleep(120)
        elif mode == "stall":
            g = init_parallel(4, 2)
            group = {"tp": g.tp_group, "ep": g.ep_group, "moe_tp": g.moe_tp_group}[args[0]]
            if g.rank == int(args[1]):
                time.sleep(600)
            dist.all_reduce(torch.ones(1), group=group)
        elif mode == "heartbeat":
            g = _world()
            world = dist.get_world_size()
            n = 0
            while True:
                t = torch.ones(1)
                dist.all_reduce(t, group=dist.group.WORLD)
                assert t.item() == world, t
                n += 1
                if n == 1 and g.rank == 0:
                    open(os.path.join(args[0], "ready"), "w").close()
                time.sleep(0.2)
        elif mode == "env":
            g = _world()
            t = torch.tensor([float(g.rank)])
            dist.all_reduce(t, group=dist.group.WORLD)
            with open(os.path.join(args[0], f"env{g.rank}.json"), "w") as fh:
                json.dump({"network": network_env(), "sum": t.item(),
                           "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
                           "world": dist.get_world_size()}, fh)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
