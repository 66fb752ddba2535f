"""Several machines through the launcher, played by two launchers on 127.0.0.1: ``--nnodes 2
--nproc-per-node 2`` with a c10d rendezvous (or static mode) forms world 4.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_launcher_multinode.py -q

- the correctness sweep's worker (job ``sweep-worker``) passes every layout of world 4;
- the end-to-end parity of tests/integration/test_e2e_launch.py (logits and greedy tokens of four
  architectures against transformers+PEFT) at (tp, ep) = (4, 2) (TP across the two nodes:
  rank 0 warns) and (2, 2) (one DP replica per node);
- SIGKILL of either node's launcher (node 0 hosts the rendezvous store) ends the other one
  non-zero within a bound, its report saying that its ranks lost their peers, and leaves no
  worker of either node running;
- static mode (``--node-rank``, ``$MASTER_ADDR``/``$MASTER_PORT``) forms the same world, and
  network variables reach every worker untouched.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from moelora_dist.testing import tiny
from moelora_dist.parallel.layout import valid_layouts
from tests.integration.launching import Nodes, alive, last_line, read_pids, wait_for
from tests.integration.test_e2e_launch import LAYOUTS, _check, cases  # noqa: F401  (fixture)
from tests.launch_driver import driver_args

# Two launchers start 4 processes on 2 cores; the runs below take 10-30 s.
RUN_LIMIT_S = 240
# From the SIGKILL of one launcher to the other's exit. The survivors' ranks are in an
# all-reduce every 0.2 s, so they see their peers' connections close at once; measured
# 0.8-2.1 s for either victim. A job busy outside collectives would notice at its next one, at
# worst --timeout later.
KILL_TO_EXIT_S = 30


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_sweep_worker_on_two_nodes(tmp_path):
    cfg = tiny.TinyMoEConfig()
    ckpt = tiny.save_checkpoint(cfg, tmp_path / "tiny")
    out = tmp_path / "rows.jsonl"
    with Nodes(2, 2, ["sweep-worker", "--checkpoint", str(ckpt), "--out", str(out)],
               tmp_path) as nodes:
        assert nodes.wait(RUN_LIMIT_S) == [0, 0], nodes.logs()
    rows = _rows(out)
    want = {(lay.tp, lay.ep, d) for lay in valid_layouts(4, cfg.num_experts, cfg.intermediate)
            for d in ("all_reduce", "all_to_all")}
    assert {(r["tp"], r["ep"], r["dispatcher"]) for r in rows} == want
    assert len(rows) == len(want)
    for r in rows:
        assert r["world"] == 4 and r["passed"], r


E2E = [lay for lay in LAYOUTS if lay[:2] in ((4, 2), (2, 2))]


@pytest.mark.parametrize("tp,ep,dispatcher", E2E, ids=[f"tp{t}-ep{e}-{d}" for t, e, d in E2E])
def test_e2e_parity_on_two_nodes(cases, tp, ep, dispatcher, tmp_path):  # noqa: F811
    root, refs = cases
    out = tmp_path / "out"
    out.mkdir()
    job = driver_args("tests.integration.test_e2e_launch", root, out, tp, ep, dispatcher)
    with Nodes(2, 2, job, tmp_path, timeout_s=120) as nodes:
        assert nodes.wait(RUN_LIMIT_S) == [0, 0], nodes.logs()
        logs = nodes.log(0) + nodes.log(1)
    _check(root, out, refs)
    # TP groups inside one node exactly when tp divides the 2 processes per node.
    assert ("TP groups span nodes" in logs) == (tp > 2), logs


@pytest.mark.parametrize("victim", [0, 1], ids=["store-host", "other-node"])
def test_killing_one_node_ends_the_other(victim, tmp_path):
    pid_dir = tmp_path  # the workers' pid<RANK> files, next to "ready"
    with Nodes(2, 2, ["-m", "tests.integration.fake_job", "heartbeat", str(tmp_path)],
               tmp_path, timeout_s=60, pid_dir=pid_dir) as nodes:
        wait_for(lambda: (tmp_path / "ready").exists() and len(read_pids(pid_dir)) == 4,
                 RUN_LIMIT_S, "world 4 running")
        time.sleep(1)  # a few heartbeats
        survivor = 1 - victim
        os.kill(nodes.procs[victim].pid, signal.SIGKILL)
        start = time.monotonic()
        wait_for(lambda: nodes.procs[survivor].poll() is not None, KILL_TO_EXIT_S,
                 f"node {survivor}'s launcher exiting")
        seconds = time.monotonic() - start
        line = last_line(nodes.log(survivor))
        print(f"node {victim} killed: node {survivor} exited {nodes.procs[survivor].returncode}"
              f" after {seconds:.1f} s: {line}")
        assert nodes.procs[survivor].returncode != 0
        assert line.startswith("moelora-launch: "), nodes.log(survivor)
        # Its ranks lost their peers (gloo saw the connections close), or its launcher lost
        # the rendezvous store that the dead node hosted: either way the report says so.
        assert ("every rank here only lost a peer" in line
                or "the rendezvous at 127.0.0.1:" in line), line
        pids = read_pids(pid_dir)
        wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker of both nodes gone")


def test_static_mode_and_network_variables(tmp_path):
    net = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_HCA": "mlx5_0"}
    with Nodes(2, 2, ["-m", "tests.integration.fake_job", "env", str(tmp_path)], tmp_path,
               static=True, **net) as nodes:
        assert nodes.wait(RUN_LIMIT_S) == [0, 0], nodes.logs()
        port = str(nodes.port)
    for rank in range(4):
        got = json.loads((tmp_path / f"env{rank}.json").read_text())
        assert got["world"] == 4 and got["local_world_size"] == 2
        assert got["sum"] == 0 + 1 + 2 + 3
        assert {k: got["network"][k] for k in net} == net
        assert got["network"]["MASTER_ADDR"] == "127.0.0.1"
        assert got["network"]["MASTER_PORT"] == port
