"""Compile candidates ahead of timing, in worker processes.

Triton compiles a kernel variant the first time it is launched, about a second each; a tuning
run meets a few hundred variants (tiles x switches x the specializations of the token counts),
which one process would compile one after the other for most of the time budget. Each worker
(a spawned process on the same GPU) issues a candidate's launches once on inputs of its
problem's shapes (weights left uninitialized: only shapes, strides and alignment decide what is
compiled) in compile-only mode: every Triton launch compiles and loads its kernel but runs
nothing (:func:`_compile_only`), so the workers take no GPU time from the timings running in
the main process at the same moment. The binaries land in Triton's on-disk cache, where the main
process finds them when it checks and times the candidate. A candidate that fails to compile
or to load (e.g. out of shared memory) is reported with its error and never timed.

A worker whose CUDA context breaks exits; the pool is restarted and the unfinished tasks are
submitted again (a task that takes a second worker down is reported as failed).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os

from moelora_dist.errors import one_line

_INPUTS: dict = {}
PENDING = "not compiled within the time left"


def _compile_only() -> None:
    """Make every ``kernel[grid](...)`` of this process compile and load the kernel (Triton's
    own ``warmup`` path, then the binary's load, which checks shared memory and threads) but
    launch nothing. Triton 3.x: ``KernelInterface.run(..., grid, warmup)``; the interpreter has
    its own launcher and is left alone."""
    from triton.runtime.jit import KernelInterface

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            init = getattr(kernel, "_init_handles", None)
            if init is not None:
                init()
            return kernel
        return launch

    KernelInterface.__getitem__ = getitem


def _init(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        _compile_only()


def _compile(problem, cfg, device: str) -> str | None:
    """Run ``cfg`` once on ``problem``'s shapes; None if it ran, else the error (one line)."""
    import torch

    from moelora_dist.tuning.measure import run_layer
    from moelora_dist.tuning.problems import make_inputs

    cuda = device.startswith("cuda")
    if problem not in _INPUTS:
        _INPUTS.clear()
        if cuda:
            torch.cuda.empty_cache()
        _INPUTS[problem] = make_inputs(problem, device, fill="empty")
    try:
        run_layer(_INPUTS[problem], cfg)
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # every failure of a candidate is recorded, none is fatal
        msg = one_line(f"{type(exc).__name__}: {exc}")[:300]
        if "CUDA error" in msg or "AcceleratorError" in msg:
            os._exit(3)  # this context is broken: later tasks here would fail for nothing
        return msg
    return None


class CompilePool:
    """``jobs`` workers on ``device`` (e.g. ``"cuda:0"``; 0 jobs: none, the main process
    compiles on first use)."""

    def __init__(self, jobs: int, device: str = "cuda:0"):
        self.jobs, self.device = jobs, device
        self._tasks: dict = {}  # (problem, cfg) -> Future
        self._crashes: dict = {}
        self._ex = self._start() if jobs > 0 else None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        return cf.ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_init,
                                      initargs=(self.device,))

    def submit(self, problem, cfg) -> None:
        key = (problem, cfg)
        if self._ex is not None and key not in self._tasks:
            self._tasks[key] = self._ex.submit(_compile, problem, cfg, self.device)

    def result(self, problem, cfg, timeout: float) -> str | None:
        """None when ``cfg`` compiled and ran (or compiling is left to the caller), the error
        otherwise, :data:`PENDING` when it did not finish within ``timeout`` seconds."""
        if self._ex is None:
            return None
        key = (problem, cfg)
        self.submit(problem, cfg)
        try:
            return self._tasks[key].result(timeout=max(timeout, 0.0))
        except cf.TimeoutError:
            return PENDING
        except cf.process.BrokenProcessPool:
            self._crashes[key] = self._crashes.get(key, 0) + 1
            self._restart()
            if self._crashes[key] >= 2:
                return "a compile worker died running it (CUDA error) twice"
            return self.result(problem, cfg, timeout)

    def _restart(self) -> None:
        """A worker died: start new ones and resubmit what had not finished."""
        old = self._ex
        old.shutdown(wait=False, cancel_futures=True)
        self._ex = self._start()
        for key, fut in list(self._tasks.items()):
            if fut.cancelled() or not fut.done() or fut.exception() is not None:
                self._tasks[key] = self._ex.submit(_compile, *key, self.device)

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=False, cancel_futures=True)
            self._ex = None
