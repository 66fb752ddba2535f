"""What every benchmark suite shares: the environment columns of its CSVs, the roofline
measured on the device in the same run, and the CSV writer.

    env = env_columns()                       # device, torch, triton, git commit, UTC time
    roof = measure_roofline()                 # {"hbm_bytes_per_s": ..., "bf16_flops": ...}
    write_csv(path, rows, {**env, **roof})    # environment columns first, then the rows'
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess

import torch

_ROOFLINE: dict | None = None


def git_commit() -> str:
    """The commit of the tree being measured (``+dirty`` when it has local changes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MOELORA_GIT_COMMIT", "unknown")
    return (sha or os.environ.get("MOELORA_GIT_COMMIT", "unknown")) + ("+dirty" if dirty else "")


def env_columns() -> dict:
    """The columns every CSV row starts with: device, versions, commit, UTC time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, torch=torch.__version__, triton=triton_version,
                commit=os.environ.get("MOELORA_GIT_COMMIT") or git_commit(),
                utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))


def measure_roofline(device: str = "cuda") -> dict:
    """HBM bandwidth (device-to-device copy of 2 GiB, bytes read + written) and bf16 GEMM rate
    (8192^3 on random data), medians of CUDA-event timings, measured once per process.

    Every share-of-roofline column is computed against these, not a datasheet or another
    GPU's constants."""
    global _ROOFLINE
    if _ROOFLINE is not None:
        return _ROOFLINE
    _ROOFLINE = dict(hbm_bytes_per_s=_copy_bandwidth(device), bf16_flops=_gemm_rate(device))
    torch.cuda.empty_cache()
    return _ROOFLINE


def _median_ms(fn, warmup: int, rep: int) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _copy_bandwidth(device: str) -> float:
    src = torch.randn(1 << 29, device=device).to(torch.bfloat16).repeat(2)  # 2 GiB of bf16
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _gemm_rate(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, warmup=10, rep=100)
    return 2 * 8192 ** 3 / (ms * 1e-3)


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    """``rows`` with the ``env`` columns first (missing keys left blank)."""
    keys = list(env)
    for r in rows:
        keys += [k for k in r if k not in keys]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **{k: r.get(k, "") for k in keys if k not in env}})


def device_tag(env: dict) -> str:
    return env["device"].replace(" ", "_").replace("/", "_")
