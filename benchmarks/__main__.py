"""One runner for every benchmark suite:

    python -m benchmarks --list
    python -m benchmarks kernels --out benchmarks/results/current [--quick] [--stages]
    python -m benchmarks fp8 --out benchmarks/results/current [--quick]
    python -m benchmarks engine --out-dir benchmarks/results/current [--quick]
    python -m benchmarks launches --out benchmarks/results/current [--label new]
    python -m benchmarks dispatch --nproc 2 --out benchmarks/results/current/dist_dispatch.csv
    python -m benchmarks dispatch --nproc 2 --device cpu --dry-run --out /tmp/dispatch.csv
    python -m benchmarks layer --nproc 2 --out-prefix benchmarks/results/current/dist_layer
    python -m benchmarks pool --out benchmarks/results/current
    python -m benchmarks serve --out-dir benchmarks/results/current
    python -m benchmarks sampling --out benchmarks/results/current [--quick]

A suite is a module with ``main(argv)``; a distributed one (``NPROC`` suites) is started
under torchrun with ``--nproc N`` processes, in the launcher's environment (NVLink multicast
off). Every suite writes CSVs whose first columns are the device, versions, git commit and
UTC time, and its roofline shares against the bandwidth and GEMM rate measured in the run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

# name -> (module, what it measures, processes: None = one process)
SUITES = {
    "kernels": ("benchmarks.kernels.bench_moe_lora",
                "the MoE layer's local experts with multi-LoRA vs base, reference, transformers",
                None),
    "fp8": ("benchmarks.kernels.bench_fp8",
            "FP8 experts vs bf16, FP8 + multi-LoRA vs FP8 (Qwen3, Mixtral, DeepSeek-V3 routed)",
            None),
    "overhead": ("benchmarks.kernels.bench_overhead",
                 "eager vs graph time, host time and per-kernel GPU time of the MoE layer", None),
    "engine": ("benchmarks.engine.bench_engine",
               "offline throughput of the engine, 8 adapters vs none; TTFT, TPOT, roofline",
               None),
    "launches": ("benchmarks.engine.launches",
                 "kernels and host ms per layer of an eager decode step, this tree vs another",
                 None),
    "pool": ("benchmarks.pool.bench_pool_load", "adapter load time into the slot pool", None),
    "serve": ("benchmarks.serve.bench_serve",
              "the HTTP server under load vs the offline engine: throughput, TTFT, TPOT", None),
    "sampling": ("benchmarks.sampling.bench_sampling",
                 "per-request sampling at V=151936, eager and in a graph, vs the PyTorch way",
                 None),
    "dispatch": ("benchmarks.dist.bench_dispatch",
                 "dispatch + combine vs raw NCCL all_to_all_single", "nproc"),
    "layer": ("benchmarks.dist.bench_layer", "the MoE layer on EP vs one GPU", "nproc"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__)
        for name, (_, what, dist) in SUITES.items():
            print(f"  {name:<10} {what}{' (under torchrun: --nproc N)' if dist else ''}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUITES:
        print(f"benchmarks: error: unknown suite {name!r}; one of {', '.join(SUITES)}",
              file=sys.stderr)
        return 2
    module, _, dist = SUITES[name]
    if dist:
        nproc = "2"
        if "--nproc" in rest:
            i = rest.index("--nproc")
            nproc, rest = rest[i + 1], rest[:i] + rest[i + 2:]
        from moelora_dist.parallel import launch_env

        env = dict(os.environ)
        cpu = any(a == "--device=cpu" or (a == "--device" and rest[i + 1:i + 2] == ["cpu"])
                  for i, a in enumerate(rest))  # a dry run on gloo CPU processes
        launch_env.prepare_worker_env(int(nproc), "gloo" if cpu else "nccl", 120.0, environ=env)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", nproc, "--max-restarts", "0", "-m", module, *rest]
        return subprocess.run(cmd, env=env).returncode
    return int(importlib.import_module(module).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
