"""Run a module (as ``python -m`` does) with some module-level constants of the package set
first: A/B runs of a size threshold or a kill switch inside one device call.

    python -m benchmarks.device.with_constants \\
        --set moelora_dist.kernels.align.ops:SINGLE_LAUNCH_MAX_ITEMS=-1 \\
        --set moelora_dist.moe.router:TRITON_TOPK=false -- benchmarks launches --label old

Values are JSON. A module or a name that does not exist is one line, exit 2 (a typo must not
run the unchanged code under the variant's label).
"""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys


def apply(sets: list[str]) -> None:
    for item in sets:
        target, sep, value = item.partition("=")
        module, colon, name = target.partition(":")
        if not sep or not colon:
            raise ValueError(f"--set {item!r}: expected MODULE:NAME=JSON_VALUE")
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise ValueError(f"--set {item!r}: {module} has no {name}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item!r}: {value!r} is not JSON (true/false, null, "
                             "numbers, quoted strings)") from None
        setattr(mod, name, parsed)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("with_constants: give the module to run after --", file=sys.stderr)
        raise SystemExit(2)
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m benchmarks.device.with_constants")
    p.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=JSON")
    args = p.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    if not rest:
        print("with_constants: no module after --", file=sys.stderr)
        raise SystemExit(2)
    try:
        apply(args.set)
    except (ValueError, ImportError) as e:
        print(f"with_constants: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [rest[0]] + rest[1:]
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
