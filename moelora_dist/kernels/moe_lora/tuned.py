"""Tuned configs of the MoE LoRA pipeline: the file format that ``moelora-dist tune-kernels``
writes, and the lookup behind :func:`~moelora_dist.kernels.moe_lora.configs.pick_config`.

One JSON file per device. The package ships ``tuned/<device name, spaces as _>.json``; more
files or folders of them can be named in ``$MOELORA_KERNEL_CONFIGS`` (``os.pathsep``-separated);
their entries take precedence over the package's for the same key. Every file is read once, the
first time a tuned config is asked for, and checked whole (a broken file is one
:class:`~moelora_dist.errors.FileError` naming it and the entry)::

    {"format": 1,
     "device": "NVIDIA H200",                      # torch.cuda.get_device_name()
     "runs": [{"command": "...", "utc": "...", "torch": "...", "triton": "...", ...}],
     "shapes": {
       "2048,128,8,768": {                         # H, E_l, K, I_l
         "name": "qwen3-30b-a3b",
         "bfloat16": {                             # dtype of x and the weights
                                                   # ("bfloat16+fp8": x's, FP8 experts)
           "base": {"64": {"config": {<MoEConfig fields>}, "ms": 0.29, "default_ms": 0.31,
                           "tried": 17}, ...},     # keyed by the tuned token count T
           "lora_r16": {...}}}},                   # LoRA calls whose rank tile BR is 16
     "skipped": [{"shape": "...", "dtype": "...", "mode": "...", "tokens": 64,
                  "config": {...}, "reason": "..."}]}

Lookup: the entry of the nearest tuned token count (in log2(T); a tie goes to the larger), of
the nearest tuned rank tile for a LoRA call (log2 again, ties to the larger).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

from moelora_dist.errors import FileError, OptionError
from moelora_dist.files.paths import read_json_object

FORMAT = 1
ENV_VAR = "MOELORA_KERNEL_CONFIGS"
PACKAGE_DIR = Path(__file__).with_name("tuned")


class ShapeKey(NamedTuple):
    hidden: int
    num_experts: int  # local experts E_l
    top_k: int
    inter: int  # local intermediate I_l

    def __str__(self) -> str:
        return ",".join(str(v) for v in self)

    @classmethod
    def parse(cls, text: str) -> "ShapeKey":
        parts = text.split(",")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape key {text!r} is not 'H,E_l,K,I_l' (four positive integers)")
        return cls(*(int(p) for p in parts))


def lora_mode(rank_tile: int) -> str:
    return f"lora_r{int(rank_tile)}"


FP8_SUFFIX = "+fp8"  # of the dtype key of FP8 experts' entries


def dtype_key(dtype: str, fp8: bool) -> str:
    """A file's dtype key: the activations' dtype (``"bfloat16"``), ``+fp8`` for FP8 experts
    (their tiles differ: block_k is the 128-column scale group)."""
    return dtype + (FP8_SUFFIX if fp8 else "")


def file_name(device_name: str) -> str:
    """The file name of a device's tuned configs: ``NVIDIA H200`` -> ``NVIDIA_H200.json``."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in device_name) + ".json"


def _log_nearest(want: int, have) -> int:
    """The element of ``have`` nearest to ``want`` in log2, ties to the larger."""
    lw = math.log2(max(want, 1))
    return min(have, key=lambda h: (abs(math.log2(h) - lw), -h))


def parse_file(path, data: dict | None = None) -> dict:
    """``{(device, shape, dtype, mode): {T: MoEConfig}}`` of one tuned file (checked)."""
    from moelora_dist.kernels.moe_lora.configs import MoEConfig

    what = "tuned kernel config file"
    obj = read_json_object(path, what) if data is None else data

    def bad(msg):
        raise FileError(f"{what} {path}: {msg}; rewrite it with moelora-dist tune-kernels")

    if obj.get("format") != FORMAT:
        bad(f"format {obj.get('format')!r}, expected {FORMAT}")
    device = obj.get("device")
    if not isinstance(device, str) or not device:
        bad("no 'device' name")
    shapes = obj.get("shapes")
    if not isinstance(shapes, dict):
        bad("no 'shapes' object")
    out = {}
    for skey, per_dtype in shapes.items():
        try:
            shape = ShapeKey.parse(skey)
        except ValueError as exc:
            bad(str(exc))
        if not isinstance(per_dtype, dict):
            bad(f"shape {skey}: expected an object")
        for dtype, modes in per_dtype.items():
            if dtype == "name":
                continue
            if not isinstance(modes, dict):
                bad(f"shape {skey} {dtype}: expected an object of modes")
            for mode, entries in modes.items():
                if mode != "base" and not (mode.startswith("lora_r") and mode[6:].isdigit()):
                    bad(f"shape {skey} {dtype}: unknown mode {mode!r} (base or lora_r<BR>)")
                table = {}
                for t, entry in (entries or {}).items():
                    where = f"shape {skey} {dtype} {mode} T={t}"
                    if not str(t).isdigit() or int(t) < 1:
                        bad(f"{where}: the token count must be a positive integer")
                    if not isinstance(entry, dict) or "config" not in entry:
                        bad(f"{where}: expected {{\"config\": {{...}}, ...}}")
                    try:
                        table[int(t)] = MoEConfig.from_dict(entry["config"], where)
                    except OptionError as exc:
                        bad(str(exc))
                if table:
                    out[(device, shape, dtype, mode)] = table
    return out


def _files() -> list[Path]:
    """Package files first, then those of $MOELORA_KERNEL_CONFIGS (later ones win)."""
    files = sorted(PACKAGE_DIR.glob("*.json")) if PACKAGE_DIR.is_dir() else []
    for item in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        p = Path(item)
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileError(f"${ENV_VAR} names {p}: no such file or folder; unset it or give "
                            "tuned config files written by moelora-dist tune-kernels")
    return files


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """Every tuned entry known: ``{(device, ShapeKey, dtype, mode): {T: MoEConfig}}``."""
    merged: dict = {}
    for path in _files():
        for key, entries in parse_file(path).items():
            merged.setdefault(key, {}).update(entries)
    return merged


def reload() -> None:
    """Forget what was read (files changed, or ``$MOELORA_KERNEL_CONFIGS`` did)."""
    from moelora_dist.kernels.moe_lora.configs import pick_config

    table.cache_clear()
    pick_config.cache_clear()


def _lora_tiles(device_name: str, shape: ShapeKey, dtype: str) -> list[int]:
    """The rank tiles BR any file has LoRA entries for, for this device, shape and dtype."""
    return [int(m[6:]) for (d, s, dt, m) in table()
            if (d, s, dt) == (device_name, shape, dtype) and m.startswith("lora_r")]


def has_lora_entries(device_name: str, shape: ShapeKey, dtype: str) -> bool:
    """Whether any file has LoRA entries (of any rank tile) for this device, shape and dtype."""
    return bool(_lora_tiles(device_name, shape, dtype))


def lookup(device_name: str, shape: ShapeKey, dtype: str, mode: str, num_tokens: int):
    """The tuned :class:`MoEConfig` for a call, or None when no file has the key."""
    known = table()
    entries = known.get((device_name, shape, dtype, mode))
    if entries is None and mode.startswith("lora_r"):
        # Only a larger rank tile: tiles tuned at BR fit every smaller BR (the LoRA buffers
        # in shared memory shrink with it), not a larger one (rank 64 on r16 tiles asked the
        # H200 for 288 KiB of shared memory).
        ranks = [r for r in _lora_tiles(device_name, shape, dtype) if r >= int(mode[6:])]
        if ranks:
            entries = known[(device_name, shape, dtype, lora_mode(min(ranks)))]
    if not entries:
        return None
    return entries[_log_nearest(num_tokens, list(entries))]
