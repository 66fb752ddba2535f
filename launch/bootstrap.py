"""What each process runs under the launcher: tie its life to the launcher, log from rank 0,
then run the job and record how it failed.

    python -m launch.bootstrap <module> [args]      (started by the launcher, never by hand)

1. :func:`die_with_launcher` first, before anything slow is imported: ``prctl(PR_SET_PDEATHSIG,
   SIGKILL)`` (Linux, :func:`moelora_dist.parallel.launch_env.die_with_parent`) so that the
   kernel kills this process when the launcher dies, even by SIGKILL, then a check that the
   parent is still the launcher (``$MOELORA_LAUNCH_PID``): a launcher that died before the call
   would never trigger the signal.
2. A ``moelora_dist.cli.<name>`` module (it defines ``add_arguments`` and ``main``) is run
   through its own parser; any other module runs as ``__main__``.
3. Failures reach the launcher through torchelastic's per-rank error file
   (``$TORCHELASTIC_ERROR_FILE``, JSON): a user error (``MoeloraError``, the family) is
   reported by :func:`moelora_dist.errors.report_user_error`, which writes the one line there
   and prints nothing under the launcher, and the process exits 2; a non-zero exit code with
   no exception is recorded with that code (:func:`record_exit`); any other exception keeps
   its traceback on stderr and is recorded by torchelastic's ``record`` with
   :class:`JobErrorHandler`, which adds the collective and process group it was raised in (a
   timeout names ``in all_reduce on group ep1_tp4ep2, ranks [1, 3]``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
import time
import traceback

from moelora_dist.parallel.launch_env import LAUNCHER_PID_ENV, die_with_parent


def die_with_launcher() -> bool:
    """Have the kernel SIGKILL this process when its parent (the launcher) dies; returns
    whether it was armed (Linux, started by the launcher)."""
    expected = os.environ.get(LAUNCHER_PID_ENV)
    return bool(expected) and die_with_parent(int(expected))


def collective_of(exc: BaseException) -> dict | None:
    """``{"op", "group", "ranks"}`` of the innermost public ``torch.distributed`` collective
    ``exc`` went through, read from its traceback's frames, or None."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if (code.co_filename.endswith(os.path.join("torch", "distributed", "distributed_c10d.py"))
                and not code.co_name.startswith("_") and "group" in frame.f_locals):
            found = (code.co_name, frame.f_locals["group"])
        tb = tb.tb_next
    if found is None:
        return None
    op, group = found
    from moelora_dist.parallel.groups import group_ranks

    desc = "world" if group is None else getattr(group, "group_desc", None)
    return {"op": op, "group": desc, "ranks": group_ranks(group)}


def describe(exc: BaseException, collective: dict | None) -> str:
    msg = " ".join(line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines()
                   if line.strip())
    if collective:
        where = f"in {collective['op']}"
        if collective["group"]:
            where += f" on group {collective['group']}"
        if collective["ranks"] is not None:
            where += f", ranks {collective['ranks']}"
        msg += f" ({where})"
    return msg


def write_error_file(data: dict) -> None:
    """Write this rank's torchelastic error file (JSON), atomically: the launcher may stop the
    rank while it writes, and torchelastic's monitor raises on a half-written file."""
    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    with open(f"{path}.tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(f"{path}.tmp", path)


def record_exit(code: int, message: str | None = None) -> None:
    """Record a non-zero exit that raised nothing (``return 3``, ``sys.exit(3)``), unless the
    rank already recorded its error (``report_user_error``). Without it a rank that exits 3
    and is stopped by the launcher while Python shuts down (its peers, having lost it, failed
    first) would look like a victim, its exit code lost."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    text = message or (f"exited with code {code} (the job gave no error message; see that "
                       f"rank's output above)")
    write_error_file({"message": {"message": text, "extraInfo": {
        "timestamp": str(int(time.time())), "exit_code": code}}})


def _handler_class():
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    class JobErrorHandler(ErrorHandler):
        """torchelastic's error file, with the collective and group of the failure added."""

        def record_exception(self, e: BaseException) -> None:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if not path:
                return
            try:
                collective = collective_of(e)
            except Exception:  # the report must not hide the job's own error
                collective = None
            data = {"message": {"message": describe(e, collective), "extraInfo": {
                "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time())),
                "exit_code": 1, "collective": collective}}}
            write_error_file(data)

    return JobErrorHandler


def _run_module(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name) if module_name.startswith(
        "moelora_dist.cli.") else None
    if module is not None and hasattr(module, "add_arguments") and hasattr(module, "main"):
        parser = argparse.ArgumentParser(prog=module_name)
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv)) or 0)
    sys.argv = [module_name, *argv]
    runpy.run_module(module_name, run_name="__main__", alter_sys=True)
    return 0


def run_job(module_name: str, argv: list[str]) -> int:
    """Run the job; returns its exit code. A user error becomes its one-line report and 2;
    a non-zero exit is recorded (:func:`record_exit`)."""
    from moelora_dist.errors import MoeloraError, report_user_error
    from moelora_dist.logs import setup_logging

    setup_logging()
    message = None
    try:
        code = _run_module(module_name, argv)
    except SystemExit as exc:  # sys.exit(N) / sys.exit("text"), as Python itself handles it
        code = exc.code
        if code is not None and not isinstance(code, int):
            message = " ".join(str(code).split())
            print(code, file=sys.stderr, flush=True)
            code = 1
        code = code or 0
    except MoeloraError as exc:
        return report_user_error(module_name, exc)
    if code:
        record_exit(code, message)
    return code


def main(argv: list[str]) -> int:
    die_with_launcher()
    if not argv:
        print("usage: python -m launch.bootstrap MODULE [ARGS...]", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run_job, error_handler=_handler_class()())(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
