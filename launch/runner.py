"""Launch a job on N processes of this machine through ``torch.distributed.run``.

    python -m launch --nproc-per-node 4 sweep-worker --out /tmp/r.jsonl
    python -m launch --nproc-per-node 2 -m pytest tests/multi_gpu -q
    moelora-launch --nproc-per-node 2 --device cuda -m moelora_dist.cli.sweep_worker ...

``<job>`` is a ``moelora_dist.cli.<job>`` module (dashes become underscores) or, after
``-m``, any module. Plain ``torchrun --nproc-per-node N -m moelora_dist.cli.<job>`` works too;
this launcher adds what a serving job needs:

- gloo on CPU processes, NCCL on GPUs (``--device``; exported as ``MOELORA_DIST_BACKEND``);
- ``OMP_NUM_THREADS`` = cores / processes (at least 1), so N processes do not oversubscribe;
- NVLink multicast off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
  ``NVSHMEM_DISABLE_NVLS=1`` (left as they are when already set);
- logs from rank 0 only (:mod:`launch.bootstrap`);
- a failure of any rank stops every other rank (torchelastic's monitor, every
  ``--monitor-interval`` seconds) and exits non-zero with a report naming the rank and its
  error; a rank stuck in a collective gives up after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys

SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
TIMEOUT_ENV = "MOELORA_DIST_TIMEOUT"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelora-launch", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] (JOB | -m MODULE) [job args]")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes to start (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: gloo; cuda: NCCL, one GPU per process; auto: cuda when available")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a collective may wait before its rank fails (default 120)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP threads per process (default: cores / processes)")
    p.add_argument("--monitor-interval", type=float, default=0.5,
                   help="seconds between checks of the workers (bounds the time to stop "
                        "the others after a failure)")
    p.add_argument("-m", dest="module", default=None, help="run this module instead of a job")
    p.add_argument("job", nargs="?", help="a moelora_dist.cli job name, e.g. sweep-worker")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the job")
    return p


def resolve_module(job: str | None, module: str | None) -> str:
    if module is not None:
        return module
    if not job:
        raise SystemExit("moelora-launch: give a job name or -m MODULE")
    name = job.replace("-", "_")
    return name if "." in name else f"moelora_dist.cli.{name}"


def prepare_env(nproc: int, device: str, timeout: float, threads: int | None) -> str:
    """Set the environment the workers inherit; returns the resolved device."""
    import torch

    if nproc < 1:
        raise SystemExit(f"moelora-launch: --nproc-per-node must be >= 1, got {nproc}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        have = torch.cuda.device_count()
        if have < nproc:
            raise SystemExit(f"moelora-launch: {nproc} processes need {nproc} GPUs, this machine "
                             f"has {have}; lower --nproc-per-node or use --device cpu")
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["MOELORA_DIST_BACKEND"] = "nccl" if device == "cuda" else "gloo"
    os.environ[TIMEOUT_ENV] = str(timeout)
    cores = os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads or max(1, cores // nproc))
    return device


# Errors a rank raises because *another* rank died (its peer closed the connection, the
# communicator was aborted): they name the victim, not the cause.
SECONDARY = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
             "communicator was aborted", "NCCL error", "Broken pipe", "SIGTERM", "Signal 15")


def _message(failure) -> str:
    msg = failure.message
    if not isinstance(msg, str):
        msg = (msg or {}).get("message", "")
    return msg.strip()


def root_cause_rank(failures: dict) -> int:
    """The rank whose own error started the failure: the earliest failure whose message is not
    a consequence of a peer dying; the earliest of all when every one looks secondary."""
    order = sorted(failures, key=lambda r: (failures[r].timestamp, r))
    primary = [r for r in order if not any(p in _message(failures[r]) for p in SECONDARY)
               and failures[r].exitcode != -15]
    return (primary or order)[0]


def format_failure(exc) -> str:
    """One line per failed rank (rank, exit code, recorded error), root cause named first."""
    first = root_cause_rank(exc.failures)
    lines = [f"moelora-launch: job failed on {len(exc.failures)} rank(s); the first to fail "
             f"was rank {first}"]
    for rank in [first, *sorted(r for r in exc.failures if r != first)]:
        f = exc.failures[rank]
        detail = _message(f) or "no error recorded (see that rank's output above)"
        lines.append(f"  rank {rank} (local {f.local_rank}, pid {f.pid}) exit code "
                     f"{f.exitcode}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    module = resolve_module(ns.job, ns.module)
    job_args = ns.args if ns.module is None else ([ns.job] if ns.job else []) + ns.args
    prepare_env(ns.nproc_per_node, ns.device, ns.timeout, ns.threads)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    targs = get_args_parser().parse_args([
        "--nproc-per-node", str(ns.nproc_per_node), "--standalone", "--max-restarts", "0",
        "--monitor-interval", str(ns.monitor_interval),
        "-m", "launch.bootstrap", module, *job_args])
    try:
        run(targs)
    except ChildFailedError as exc:
        print(format_failure(exc), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
