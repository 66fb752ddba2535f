"""Every process group has the job's timeout: a rank that never joins a collective on the TP,
EP or MoE-TP group fails its peers after ``--timeout`` seconds, and the report names the rank
that timed out, the collective, the group and the ranks that did not join it.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_launcher_timeouts.py -q

Layout tp=4, ep=2 on world 4: TP group [0, 1, 2, 3], EP groups [0, 2] and [1, 3], MoE-TP
groups [0, 1] and [2, 3]. Without a timeout on the subgroups (torch's default is 30 min) the
launch would run into the 90 s subprocess limit instead.
"""

import re

import pytest

from tests.integration.launching import JOB, last_line, run_launcher

TIMEOUT_S = 5
# The launch must end within TIMEOUT_S + BOUND_S of its start: process start-up (~4-5 s for 4
# processes on 2 cores), the timeout, the monitor's 0.5 s, the shutdown. Measured 9.6-14.5 s.
BOUND_S = 20
# (group, stalled rank, group description of the peer that times out, its ranks)
CASES = [("tp", 2, "tp0_tp4ep2", [0, 1, 2, 3]), ("ep", 3, "ep1_tp4ep2", [1, 3]),
         ("moe_tp", 1, "moe_tp0_tp4ep2", [0, 1])]


@pytest.mark.parametrize("group,stalled,desc,ranks", CASES, ids=[c[0] for c in CASES])
def test_a_stalled_rank_times_out_its_group_and_is_named(group, stalled, desc, ranks):
    proc, elapsed = run_launcher(["--nproc-per-node", "4", "--timeout", str(TIMEOUT_S),
                                  "-m", JOB, "stall", group, str(stalled)], timeout=90)
    out = proc.stdout
    line = last_line(out)
    print(f"{group}: ended after {elapsed:.1f} s: {line}")
    assert proc.returncode == 1, out
    assert elapsed < TIMEOUT_S + BOUND_S, f"{elapsed:.1f} s"
    first = int(re.match(r"moelora-launch: rank (\d+) ", line).group(1))
    assert first in ranks and first != stalled, line
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in line
    assert f"(in all_reduce on group {desc}, ranks {ranks})" in line
    suspects = re.search(r"that did not fail in it: ([\d, ]+) \(", line).group(1)
    assert stalled in [int(r) for r in suspects.split(",")], line
