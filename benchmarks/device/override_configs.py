"""A tuned-config file whose entries are the shipped ones with some fields set: for A/B runs of a
kernel switch inside one device call, without re-tuning.

    python -m benchmarks.device.override_configs --set lora_prefetch=false \
        --mode lora_r16 --max-tokens 256 --out /tmp/no_prefetch.json
    MOELORA_KERNEL_CONFIGS=/tmp/no_prefetch.json python -m benchmarks launches --label ...

Values are JSON (``false``, ``3``, ``null``). Every entry of the chosen modes up to
``--max-tokens`` gets them, on every shape and dtype of the package's file for ``--device``;
entries the setting contradicts are left out (they keep the package's config), and the result
is checked by the same parser as the shipped files (a setting that contradicts every entry, or
a bad value, is one line, exit 2). Entries the file does not name keep the package's values
(``$MOELORA_KERNEL_CONFIGS`` entries win per key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelora_dist.errors import FileError, OptionError
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import MoEConfig


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


def _valid(config: dict) -> bool:
    try:
        MoEConfig.from_dict(config)
    except OptionError:
        return False
    return True


def overridden(data: dict, sets: dict, modes: set[str], max_tokens: int) -> tuple[dict, int]:
    """``data`` (a tuned file's JSON) reduced to the entries of ``modes`` up to ``max_tokens``,
    each with ``sets`` applied to its config, and the number of entries left out because the
    setting contradicts them (e.g. ``down_shrink_split_k`` on a ``fuse_down_shrink`` entry:
    those keep the package's config)."""
    shapes, dropped = {}, 0
    for key, per_shape in data["shapes"].items():
        kept = {"name": per_shape.get("name", key)}
        for dtype, per_dtype in per_shape.items():
            if dtype == "name":
                continue
            kept[dtype] = {}
            for mode, entries in per_dtype.items():
                if mode not in modes:
                    continue
                new = {t: dict(e, config={**e["config"], **sets}) for t, e in entries.items()
                       if int(t) <= max_tokens}
                ok = {t: e for t, e in new.items() if _valid(e["config"])}
                dropped += len(new) - len(ok)
                kept[dtype][mode] = ok
        shapes[key] = kept
    return dict(format=data["format"], device=data["device"],
                runs=[dict(command="override_configs " + json.dumps(sets))], shapes=shapes,
                skipped=[]), dropped


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
        data, dropped = overridden(json.loads(src.read_text()), sets,
                                   set(args.mode or ["lora_r16"]), args.max_tokens)
        if not any(es for s in data["shapes"].values() for dt, m in s.items() if dt != "name"
                   for es in m.values()):
            raise ValueError(f"{json.dumps(sets)} contradicts every chosen entry; nothing to "
                             "run (see MoEConfig.check)")
        args.out.write_text(json.dumps(data, indent=1))
        tuned.parse_file(args.out)  # the lookup's own checks, before any run uses it
    except (ValueError, FileError) as exc:
        print(f"override_configs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {json.dumps(sets)} on {sorted(args.mode or ['lora_r16'])} "
          f"entries up to T={args.max_tokens} ({dropped} left out: the setting contradicts "
          "them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
