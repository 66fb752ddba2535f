"""The environment a distributed job runs in: what the launcher sets, and what it leaves alone.

    from moelora_dist.parallel import launch_env
    launch_env.prepare_worker_env(nproc_per_node=4, backend="nccl", timeout_s=120.0)
    launch_env.timeout_s()            # seconds every process group waits (float)
    launch_env.network_env()          # {"NCCL_SOCKET_IFNAME": "eth0", ...} as given by the user

``launch/runner.py`` calls :func:`prepare_worker_env` in the launcher before it starts the
workers, which inherit the variables; :mod:`moelora_dist.parallel.groups` reads the backend
and the timeout back with :func:`backend_from_env` / :func:`timeout_s`. The same variables
set by hand make plain ``torchrun`` behave like the launcher. This module is library code:
it never imports :mod:`launch` (``launch`` imports ``moelora_dist``, never the reverse).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import MutableMapping

from moelora_dist.errors import OptionError

BACKEND_ENV = "MOELORA_DIST_BACKEND"
TIMEOUT_ENV = "MOELORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# The launcher's pid, set by the launcher for its workers: a worker whose parent is this pid
# is a rank of the launcher (it arms its parent-death signal against it, and
# moelora_dist.errors.report_user_error, which reads the same name, leaves the printing of a
# user error to the launcher).
LAUNCHER_PID_ENV = "MOELORA_LAUNCH_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# NVLink multicast (NCCL NVLS, symmetric-memory multicast, NVSHMEM NVLS) off: on the shared GPU
# hosts this project runs on, a program that uses it can put the host's GPUs out of service for
# everyone. Defaults only, as before: a value already in the environment is kept.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# Network variables the launcher never sets, changes or drops: the workers inherit them as the
# user (or the scheduler) exported them. Names ending in "_" are prefixes (NCCL_IB_HCA, ...).
# MASTER_ADDR / MASTER_PORT are the defaults of the launcher's static mode
# (--master-addr/--master-port); torchrun sets the workers' copies from the rendezvous.
NETWORK_ENV = (
    "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_FAMILY",
    "NCCL_IB_", "NCCL_NET", "NCCL_NET_", "NCCL_CROSS_NIC", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS",
    "MASTER_ADDR", "MASTER_PORT",
)


def is_network_var(name: str) -> bool:
    return any(name.startswith(p) if p.endswith("_") else name == p for p in NETWORK_ENV)


def network_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The network variables present in ``environ`` (default ``os.environ``), sorted by name."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in sorted(env) if is_network_var(k)}


def backend_for_device(device_type: str) -> str:
    """NCCL for CUDA processes, gloo for CPU ones."""
    return "nccl" if device_type == "cuda" else "gloo"


def backend_from_env(environ: MutableMapping[str, str] | None = None) -> str | None:
    """``$MOELORA_DIST_BACKEND`` or None when unset/empty."""
    env = os.environ if environ is None else environ
    return env.get(BACKEND_ENV) or None


def timeout_s(value: float | None = None,
              environ: MutableMapping[str, str] | None = None) -> float:
    """``value``, else ``$MOELORA_DIST_TIMEOUT``, else 120: the seconds any collective may wait
    for its peers before its rank fails (every process group of the job gets it)."""
    env = os.environ if environ is None else environ
    if value is None:
        raw = env.get(TIMEOUT_ENV)
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            raise OptionError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise OptionError(f"the collective timeout must be > 0 seconds, got {value!r}")
    return float(value)


def threads_per_process(nproc_per_node: int, threads: int | None = None) -> int:
    """``threads``, else this machine's cores / processes (at least 1): N processes of one
    node must not each start a thread per core."""
    if threads is not None:
        if threads < 1:
            raise OptionError(f"--threads must be >= 1, got {threads}")
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))


def prepare_worker_env(nproc_per_node: int, backend: str, timeout: float,
                       threads: int | None = None,
                       environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set in ``environ`` (default ``os.environ``) what every worker of this node inherits:
    NVLink multicast off (defaults only), the backend, the timeout and ``OMP_NUM_THREADS``.
    Network variables are left exactly as they are. Returns what was set."""
    env = os.environ if environ is None else environ
    if backend not in ("gloo", "nccl"):
        raise OptionError(f"unknown backend {backend!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
    out = {k: v for k, v in SAFE_ENV.items() if k not in env}
    out[BACKEND_ENV] = backend
    out[TIMEOUT_ENV] = repr(timeout_s(timeout))
    out["OMP_NUM_THREADS"] = str(threads_per_process(nproc_per_node, threads))
    assert not any(is_network_var(k) for k in out)  # the pass-through promise
    env.update(out)
    return out


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies, even by SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``); returns whether it was armed (Linux only). Used by the
    launcher's workers and by the server's HTTP frontend, so neither outlives its parent."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    # The signal fires on the parent's death *after* the call only: if the parent is already
    # gone we were re-parented, and nobody would ever stop us.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return True
