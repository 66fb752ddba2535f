"""Launch a job on N processes per machine, on one machine or several, through
``torch.distributed.run`` (torchrun) in this process.

    python -m launch --nproc-per-node 4 sweep-worker --checkpoint DIR --out /tmp/r.jsonl
    python -m launch --nproc-per-node 2 -m pytest tests/multi_gpu -q
    moelora-launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29400 --rdzv-id job1 \\
        logits --model DIR ...                  # the same command on each of the two machines

``<job>`` is a ``moelora_dist.cli.<job>`` module (dashes become underscores) or, after
``-m``, any module. Plain ``torchrun -m moelora_dist.cli.<job>`` works too; this launcher
adds what a serving job needs (docs/launch.md has the details and the multi-node setup):

- gloo on CPU processes, NCCL on GPUs (``--device``), ``OMP_NUM_THREADS`` = cores / processes,
  NVLink multicast off, the collective timeout (``--timeout``) on every process group:
  :func:`moelora_dist.parallel.launch_env.prepare_worker_env`; network variables
  (``NCCL_SOCKET_IFNAME``, ``GLOO_SOCKET_IFNAME``, ``NCCL_IB_*``, ...) pass through untouched;
- rendezvous: ``--standalone`` by default; ``--nnodes`` with ``--rdzv-endpoint`` (c10d) or
  with ``--master-addr/--node-rank`` (static) for several machines (:func:`rendezvous_args`);
- logs from rank 0 only, and workers that die with the launcher, even on SIGKILL
  (:mod:`launch.bootstrap`);
- a failure of any rank stops the others (torchelastic's monitor, every
  ``--monitor-interval`` s) and the launcher exits with the exit code of the rank that failed
  first (128 + N for signal N), after a report whose last line is that rank's reason, printed
  once (:func:`format_failure`). A user error exits 2 with its one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from moelora_dist.errors import MoeloraError, OptionError, one_line, report_user_error
from moelora_dist.parallel import launch_env

SAFE_ENV = launch_env.SAFE_ENV
TIMEOUT_ENV = launch_env.TIMEOUT_ENV
PROG = "moelora-launch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] (JOB | -m MODULE) [job args]")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes to start on this machine (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: gloo; cuda: NCCL, one GPU per process; auto: cuda when available")
    p.add_argument("--timeout", type=float, default=launch_env.DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for its peers before its rank fails "
                        "(every process group; default %(default)g)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP threads per process (default: cores / processes)")
    p.add_argument("--monitor-interval", type=float, default=0.5,
                   help="seconds between checks of the workers (bounds the time to stop "
                        "the others after a failure)")
    m = p.add_argument_group("several machines (docs/launch.md)")
    m.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    m.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="c10d rendezvous: a host:port every machine reaches; the machine "
                        "whose address it is hosts the rendezvous store")
    m.add_argument("--rdzv-backend", choices=("c10d",), default=None,
                   help="rendezvous backend (c10d, the default with --rdzv-endpoint)")
    m.add_argument("--rdzv-id", default="moelora",
                   help="job id, the same on every machine of one job (default moelora)")
    m.add_argument("--master-addr", default=None,
                   help="static mode: address of node 0 (default $MASTER_ADDR)")
    m.add_argument("--master-port", type=int, default=None,
                   help="static mode: port of node 0 (default $MASTER_PORT, else 29500)")
    m.add_argument("--node-rank", type=int, default=None,
                   help="static mode: this machine's index, 0 .. nnodes-1")
    m.add_argument("--local-addr", default=None,
                   help="address of this machine that the others reach (default: its "
                        "hostname)")
    p.add_argument("-m", dest="module", default=None, help="run this module instead of a job")
    p.add_argument("job", nargs="?", help="a moelora_dist.cli job name, e.g. sweep-worker")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the job")
    return p


def resolve_module(job: str | None, module: str | None) -> str:
    if module is not None:
        return module
    if not job:
        raise OptionError("give a job name (e.g. sweep-worker) or -m MODULE")
    name = job.replace("-", "_")
    return name if "." in name else f"moelora_dist.cli.{name}"


def prepare_env(nproc: int, device: str, timeout: float, threads: int | None) -> str:
    """Set the environment the workers of this machine inherit; returns the resolved device."""
    import torch

    if nproc < 1:
        raise OptionError(f"--nproc-per-node must be >= 1, got {nproc}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        have = torch.cuda.device_count()
        if have < nproc:
            raise OptionError(f"{nproc} processes need {nproc} GPUs, this machine has {have}; "
                              f"lower --nproc-per-node or use --device cpu")
    launch_env.prepare_worker_env(nproc, launch_env.backend_for_device(device), timeout,
                                  threads)
    return device


def _endpoint(text: str, flag: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"{flag} {text!r} is not HOST:PORT (e.g. node0:29400)")
    return text


def rendezvous_args(ns: argparse.Namespace, environ=None) -> list[str]:
    """torchrun's rendezvous options for the launcher's: standalone, c10d or static."""
    env = os.environ if environ is None else environ
    if ns.nnodes < 1:
        raise OptionError(f"--nnodes must be >= 1, got {ns.nnodes}")
    dynamic = ns.rdzv_endpoint is not None or ns.rdzv_backend is not None
    static = ns.master_addr is not None or ns.master_port is not None or ns.node_rank is not None
    if dynamic and static:
        raise OptionError("--rdzv-endpoint/--rdzv-backend (c10d rendezvous) and --master-addr/"
                          "--master-port/--node-rank (static) are two ways for the machines to "
                          "meet; give one (c10d assigns the node ranks itself)")
    local = ["--local-addr", ns.local_addr] if ns.local_addr else []
    if dynamic:
        if ns.rdzv_endpoint is None:
            raise OptionError("--rdzv-backend c10d needs --rdzv-endpoint HOST:PORT (a machine "
                              "every node reaches, e.g. node 0)")
        return ["--nnodes", str(ns.nnodes), "--rdzv-backend", ns.rdzv_backend or "c10d",
                "--rdzv-endpoint", _endpoint(ns.rdzv_endpoint, "--rdzv-endpoint"),
                "--rdzv-id", ns.rdzv_id, *local]
    if not static and ns.nnodes == 1:
        return ["--standalone", *local]
    addr = ns.master_addr or env.get("MASTER_ADDR")
    port = ns.master_port or env.get("MASTER_PORT") or "29500"
    if ns.nnodes > 1 and not addr:
        raise OptionError(f"--nnodes {ns.nnodes} needs a meeting point: --rdzv-endpoint "
                          f"HOST:PORT (c10d), or --master-addr HOST and --node-rank R (static)")
    if ns.nnodes > 1 and ns.node_rank is None:
        raise OptionError(f"static mode with --nnodes {ns.nnodes} needs --node-rank (0 on the "
                          f"machine at --master-addr, 1 .. {ns.nnodes - 1} on the others)")
    node_rank = ns.node_rank or 0
    if not 0 <= node_rank < ns.nnodes:
        raise OptionError(f"--node-rank {node_rank} is outside 0 .. {ns.nnodes - 1}")
    _endpoint(f"{addr or '127.0.0.1'}:{port}", "--master-addr/--master-port")
    return ["--nnodes", str(ns.nnodes), "--node-rank", str(node_rank),
            "--master-addr", addr or "127.0.0.1", "--master-port", str(port), *local]


# Errors a rank raises because *another* rank died (its peer closed the connection, the
# communicator was aborted): they name the victim, not the cause.
SECONDARY = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
             "communicator was aborted", "NCCL error", "Broken pipe", "SIGTERM", "Signal 15")
NO_FILE = "<N/A>"  # torchelastic's ProcessFailure.error_file when the rank wrote none


def _message(failure) -> str:
    msg = failure.message
    if not isinstance(msg, str):
        msg = (msg or {}).get("message", "")
    return msg.strip()


def _extra(failure) -> dict:
    data = getattr(failure, "error_file_data", None) or {}
    msg = data.get("message") if isinstance(data, dict) else None
    return (msg.get("extraInfo") or {}) if isinstance(msg, dict) else {}


def _is_secondary(failure) -> bool:
    """A failure caused by another rank's: a lost peer, or SIGTERM (how the launcher stops
    the others) with no error of its own. A rank that recorded its error and was then
    stopped while exiting keeps its error; SIGKILL comes from outside (the OOM killer)."""
    if any(p in _message(failure) for p in SECONDARY):
        return True
    return not _recorded(failure) and failure.exitcode == -15


def root_cause_rank(failures: dict) -> int:
    """The rank whose own error started the failure: the earliest failure whose message is not
    a consequence of a peer dying; the earliest of all when every one looks secondary."""
    # At one timestamp (seconds), prefer a rank that exited by itself: one stopped by the
    # launcher while it was exiting after recording its error says less about the exit code.
    order = sorted(failures, key=lambda r: (failures[r].timestamp, failures[r].exitcode == -15, r))
    primary = [r for r in order if not _is_secondary(failures[r])]
    return (primary or order)[0]


def _recorded(failure) -> bool:
    return getattr(failure, "error_file", NO_FILE) != NO_FILE


def own_exit_code(failure) -> int | None:
    """The code the rank exited with, or was exiting with when the launcher stopped it (from
    its error record: launch/bootstrap.py and report_user_error write it); None for a rank
    killed before it recorded anything."""
    if failure.exitcode >= 0:
        return failure.exitcode
    if not _recorded(failure):
        return None
    extra = _extra(failure)
    if "exit_code" in extra:
        return int(extra["exit_code"])
    return 2 if extra.get("user_error") else 1


def exit_code(failure) -> int:
    """The launcher's exit code for a root-cause failure: the rank's own (also when it was
    stopped while exiting after recording it); 128 + N for a rank killed by signal N."""
    own = own_exit_code(failure)
    return 128 - failure.exitcode if own is None else (own or 1)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _code(failure) -> str:
    own = own_exit_code(failure)
    if own is None or own == failure.exitcode:
        return f"exit code {failure.exitcode}"
    return f"exit code {own} ({_signal_name(-failure.exitcode)} while exiting)"


def reason(failure) -> str:
    """One line: why this rank failed."""
    if _recorded(failure):
        return one_line(_message(failure)) or "an empty error record"
    if failure.exitcode < 0:
        return f"killed by {_signal_name(-failure.exitcode)}"
    return (f"exited with code {failure.exitcode} without recording an error (see that rank's "
            f"output above)")


def _suspects(first: int, failures: dict) -> str:
    """For a failure inside a collective: the ranks of its group that did not fail in the
    same collective here (a stalled or dead rank is among them)."""
    where = _extra(failures[first]).get("collective") or {}
    ranks = where.get("ranks")
    if not ranks:
        return ""
    # A rank that recorded the same group in its own error file did reach the collective
    # (also one that then lost a peer in it).
    joined = {r for r, f in failures.items()
              if (_extra(f).get("collective") or {}).get("ranks") == ranks}
    others = [r for r in ranks if r not in joined]
    if not others:
        return ""
    return (f"; ranks of group {where.get('group')} that did not fail in it: "
            f"{', '.join(map(str, others))} (a stalled or dead rank is among them)")


def format_failure(exc) -> str:
    """The failure report: a summary, one line per other failed rank, and last, printed once,
    the reason of the rank that failed first (with the collective it was stuck in)."""
    failures = exc.failures
    first = root_cause_rank(failures)
    root = failures[first]
    lines = [f"{PROG}: job failed on {len(failures)} rank(s) of this machine; the first to "
             f"fail was rank {first}"]
    for rank in sorted(r for r in failures if r != first):
        f = failures[rank]
        if reason(f) == reason(root):
            detail = "the same error"
        elif f.exitcode == -15 and not _recorded(f):
            detail = f"stopped by the launcher (SIGTERM) after rank {first} failed"
        else:
            detail = reason(f)
        lines.append(f"  rank {rank} (local {f.local_rank}, pid {f.pid}) {_code(f)}: {detail}")
    last = (f"{PROG}: rank {first} (local {root.local_rank}, pid {root.pid}) {_code(root)}: "
            f"{reason(root)}{_suspects(first, failures)}")
    if _is_secondary(root) and root.exitcode != -15:
        last += (" -- every rank here only lost a peer: the rank that failed first is on "
                 "another machine (see its launcher's report) or was killed from outside")
    return "\n".join([*lines, last])


class _DropFailureLog(logging.Filter):
    """torchelastic's own "failed (exitcode: ...)" line repeats what the report says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def _quiet_cpp_logs() -> None:
    """Import torch in the launcher with C++ warnings off: when a machine dies, the rendezvous
    client here prints the C++ stack of every failed store call, while the report names the
    cause. The workers keep the user's (or torch's default) level."""
    if "TORCH_CPP_LOG_LEVEL" in os.environ:
        import torch  # noqa: F401
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        import torch  # noqa: F401  (c10 reads the level once, at load)
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def _lost(exc: BaseException, endpoint: str | None) -> str:
    cause = exc.__cause__ or exc.__context__
    detail = one_line(str(exc)).replace(" See inner exception for details.", "")
    if cause is not None:
        detail += f" ({type(cause).__name__}: {one_line(str(cause))})"
    where = f" at {endpoint}" if endpoint else ""
    return (f"{PROG}: the rendezvous{where} failed, so the machines did not meet or lost each "
            f"other (the machine hosting it may have died); the workers of this machine were "
            f"stopped: {type(exc).__name__}: {detail}")


def _run(targs) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        _DropFailureLog())
    try:
        run(targs)
    except ChildFailedError as exc:
        print(format_failure(exc), file=sys.stderr, flush=True)
        return exit_code(exc.failures[root_cause_rank(exc.failures)])
    except SignalException as exc:
        print(f"{PROG}: stopped by {signal.Signals(exc.sigval).name}; the workers of this "
              f"machine were stopped", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except RendezvousError as exc:
        print(_lost(exc, targs.rdzv_endpoint if targs.rdzv_backend != "static" else
                    f"{targs.master_addr}:{targs.master_port}"), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    _quiet_cpp_logs()
    try:
        module = resolve_module(ns.job, ns.module)
        rdzv = rendezvous_args(ns)
        prepare_env(ns.nproc_per_node, ns.device, ns.timeout, ns.threads)
    except MoeloraError as exc:
        return report_user_error(PROG, exc)
    job_args = ns.args if ns.module is None else ([ns.job] if ns.job else []) + ns.args
    # The workers' parent-death signal is armed against this pid (launch/bootstrap.py).
    os.environ[launch_env.LAUNCHER_PID_ENV] = str(os.getpid())

    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args([
        "--nproc-per-node", str(ns.nproc_per_node), *rdzv, "--max-restarts", "0",
        "--monitor-interval", str(ns.monitor_interval),
        "-m", "launch.bootstrap", module, *job_args])
    return _run(targs)


if __name__ == "__main__":
    sys.exit(main())
