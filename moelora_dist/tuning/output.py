"""The tuned file a run writes (format in :mod:`moelora_dist.kernels.moe_lora.tuned`).

A run merges into an existing file of the same device: the entries it tuned replace the old
ones, every other entry stays, and the run is appended to ``runs``; so shapes can be tuned in
several runs into one file, and so can the dtype keys of one shape (a bf16 run and an ``--fp8``
run write ``"bfloat16"`` and ``"bfloat16+fp8"`` side by side). The file is written to a
temporary name and renamed: a run stopped while writing leaves the old file whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moelora_dist.errors import FileError
from moelora_dist.files.paths import kind_of, open_for_write, read_json_object
from moelora_dist.kernels.moe_lora import tuned
from moelora_dist.kernels.moe_lora.configs import MoEConfig


def load_previous(path: str | os.PathLike, device_name: str) -> dict | None:
    """The file at ``path`` if it exists (checked), None if it does not; a file of another
    device is refused (a tuned file holds one device)."""
    if kind_of(path) == "missing":
        return None
    data = read_json_object(path, "tuned kernel config file")
    tuned.parse_file(path, data)
    if data["device"] != device_name:
        raise FileError(f"--out {path}: holds configs of {data['device']!r}, not of this "
                        f"device {device_name!r}; give another --out")
    return data


def _recorded(previous: dict | None, problem) -> dict | None:
    if previous is None:
        return None
    p = problem
    return previous["shapes"].get(str(p.shape.key), {}).get(p.dtype_key, {}).get(
        p.mode, {}).get(str(p.tokens))


def stored_entries(previous: dict | None, problems) -> tuple[dict, list]:
    """``tune-kernels --refine-order``: ``({problem: (stored config, stored default_ms)},
    problems without an entry)``."""
    found, missing = {}, []
    for p in problems:
        old = _recorded(previous, p)
        if old is None:
            missing.append(p)
        else:
            found[p] = (MoEConfig.from_dict(old["config"], f"stored entry of {p.name}"),
                        float(old.get("default_ms", float("inf"))))
    return found, missing


def stored_configs(previous: dict | None, problems) -> dict:
    """``tune-kernels --keep-faster``: ``{problem: the config --out has}``, each one more
    candidate of the search (``Tuner(stored=)``)."""
    found, _ = stored_entries(previous, problems)
    return {p: cfg for p, (cfg, _) in found.items()}


def faster_only(outcomes, previous: dict | None) -> tuple[list, int]:
    """``tune-kernels --keep-faster``: the outcomes whose time beats the entry ``previous``
    records for their problem (or that it lacks), and how many were dropped. An outcome whose
    search timed the stored entry in the same run (``Outcome.stored_timed``) is kept: that
    comparison is the fair one (the recorded time may come from another run, or predate a
    kernel change)."""
    keep = []
    for o in outcomes:
        old = _recorded(previous, o.problem)
        if old is None or o.stored_timed or o.ms < float(old.get("ms", float("inf"))):
            keep.append(o)
    return keep, len(outcomes) - len(keep)


def build(device_name: str, outcomes, skipped, run_meta: dict, previous: dict | None) -> dict:
    """The file's object: ``previous`` with this run's entries, skips and run record."""
    data = previous or {"format": tuned.FORMAT, "device": device_name, "runs": [],
                        "shapes": {}, "skipped": []}
    tuned_now = set()
    for o in sorted(outcomes, key=lambda o: (str(o.problem.shape.key), o.problem.mode,
                                             o.problem.tokens)):
        p = o.problem
        shape = data["shapes"].setdefault(str(p.shape.key), {})
        shape.setdefault("name", p.shape.name)
        table = shape.setdefault(p.dtype_key, {}).setdefault(p.mode, {})
        table[str(p.tokens)] = {"config": o.config.to_dict(), "ms": round(o.ms, 5),
                                "default_ms": round(o.default_ms, 5), "tried": o.tried,
                                "failed": o.failed}
        tuned_now.add((str(p.shape.key), p.dtype_key, p.mode, p.tokens))
    kept = [s for s in data.get("skipped", [])
            if (s.get("shape"), s.get("dtype"), s.get("mode"), s.get("tokens")) not in tuned_now]
    data["skipped"] = kept + [
        {"shape": str(s.problem.shape.key), "name": s.problem.shape.name,
         "dtype": s.problem.dtype_key, "mode": s.problem.mode, "tokens": s.problem.tokens,
         "config": s.config.to_dict(), "reason": s.reason} for s in skipped]
    data["runs"] = data.get("runs", []) + [run_meta]
    return data


def write(path: str | os.PathLike, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    with open_for_write(tmp, "tuned kernel config file") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
