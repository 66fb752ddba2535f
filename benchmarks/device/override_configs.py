"""A tuned-config file whose entries are the shipped ones with some fields set: for A/B runs of a
kernel switch inside one device call, without re-tuning.

    python -m benchmarks.device.override_configs --set lora_prefetch=false \
        --mode lora_r16 --max-tokens 256 --out /tmp/no_prefetch.json
    MOELORA_KERNEL_CONFIGS=/tmp/no_prefetch.json python -m benchmarks launches --label ...

Values are JSON (``false``, ``3``, ``null``). Every entry of the chosen modes up to
``--max-tokens`` gets them, on every shape and dtype of the package's file for ``--device``;
the result is checked by the same parser as the shipped files (a contradictory combination is
one line naming it, exit 2). Entries the file does not name keep the package's values
(``$MOELORA_KERNEL_CONFIGS`` entries win per key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelora_dist.errors import FileError
from moelora_dist.kernels.moe_lora import tuned


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=JSON_VALUE, e.g. lora_prefetch=false")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item!r}: {value!r} is not a JSON value") from None
    return out


def overridden(data: dict, sets: dict, modes: set[str], max_tokens: int) -> dict:
    """``data`` (a tuned file's JSON) reduced to the entries of ``modes`` up to ``max_tokens``,
    each with ``sets`` applied to its config."""
    shapes = {}
    for key, per_shape in data["shapes"].items():
        kept = {"name": per_shape.get("name", key)}
        for dtype, per_dtype in per_shape.items():
            if dtype == "name":
                continue
            kept[dtype] = {mode: {t: dict(e, config={**e["config"], **sets})
                                  for t, e in entries.items() if int(t) <= max_tokens}
                           for mode, entries in per_dtype.items() if mode in modes}
        shapes[key] = kept
    return dict(format=data["format"], device=data["device"],
                runs=[dict(command="override_configs " + json.dumps(sets))], shapes=shapes,
                skipped=[])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    ap.add_argument("--mode", action="append", default=None,
                    help="entry modes to override (default lora_r16); repeatable")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    src = tuned.PACKAGE_DIR / tuned.file_name(args.device)
    try:
        sets = parse_sets(args.set)
        if not src.is_file():
            raise ValueError(f"no shipped tuned file for {args.device!r} ({src})")
        data = overridden(json.loads(src.read_text()), sets, set(args.mode or ["lora_r16"]),
                          args.max_tokens)
        args.out.write_text(json.dumps(data, indent=1))
        tuned.parse_file(args.out)  # the lookup's own checks, before any run uses it
    except (ValueError, FileError) as exc:
        print(f"override_configs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {json.dumps(sets)} on {sorted(args.mode or ['lora_r16'])} "
          f"entries up to T={args.max_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
