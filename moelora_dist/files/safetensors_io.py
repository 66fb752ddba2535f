"""Weights from safetensors, through one reader: a file, or a directory of shards.

    with SafetensorsReader(path, what="checkpoint") as r:     # FileError if unreadable
        w = r.get("model.embed_tokens.weight", expect_shape=(V, H))
        rows = r.rows("model.layers.0.self_attn.q_proj.weight", 0, 512)

A directory holds ``*.safetensors`` files (a ``model.safetensors.index.json`` is checked for
shards it lists that are missing); only their headers are read up front, and tensors are
read with ``get_slice`` so a rank materializes only the rows, columns or experts it owns.
Only safetensors: pickled files (``.bin``, ``.pt``, ...) are refused and never opened.
Corrupt, truncated or empty files, keys that are missing and shapes that contradict the
config each become one :class:`~moelora_dist.errors.FileError` line naming the file and key.
The reader records which keys were read (:attr:`SafetensorsReader.read_keys`), so a loader
can refuse tensors it did not place instead of ignoring them.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from moelora_dist.errors import FileError
from moelora_dist.files.paths import describe_os_error, fail, kind_of, read_json_object, require

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# dtypes a weight may be stored in; anything else (FP8, integers, ...) is refused, never cast
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# what :meth:`SafetensorsReader.get_raw` also hands over as stored, for the FP8 loader to check:
# e4m3 / e5m2 weights (e5m2 is refused there, by name) and ue8m0 scales stored as bytes
RAW_DTYPES = WEIGHT_DTYPES + tuple(getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "uint8") if hasattr(torch, n))


def pickled_files(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    except OSError:
        return []


def refuse_pickles(directory: Path, what: str, expected: str) -> None:
    """FileError when ``directory`` holds only pickled weights (never unpickled)."""
    pickles = pickled_files(directory)
    hint = (f"only pickled weights ({', '.join(pickles)}); they are never unpickled "
            "(arbitrary code execution). Convert them to safetensors in a trusted environment"
            if pickles else f"no {expected}")
    raise fail(what, directory, hint)


def _safetensor_error(what: str, path, exc: Exception) -> FileError:
    msg = str(exc).split("\n")[0]
    return fail(what, path, f"not a readable safetensors file ({msg}); the file is corrupt "
                "or truncated: download or save it again")


def load_all(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (an adapter's), errors as FileError."""
    require(path, "file", what)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise _safetensor_error(what, path, exc) from None
    except OSError as exc:
        raise fail(what, path, describe_os_error(exc)) from None


class SafetensorsReader:
    """Key -> file map over one ``.safetensors`` file or a directory of them; sliced reads.

    Args:
        path: the file or directory.
        what: how errors name it ("checkpoint", "model directory").
    """

    def __init__(self, path: str | os.PathLike, what: str = "checkpoint"):
        self.path, self.what = Path(path), what
        kind = kind_of(self.path)
        if kind == "dir":
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                refuse_pickles(self.path, what, "*.safetensors file")
            index_json = self.path / "model.safetensors.index.json"
            if kind_of(index_json) == "file":
                index = read_json_object(index_json, "checkpoint index")
                listed = set((index.get("weight_map") or {}).values())
                missing = sorted(n for n in listed if kind_of(self.path / n) != "file")
                if missing:
                    raise fail("checkpoint index", index_json,
                               f"lists shards that are missing: {missing}")
        elif kind == "file" and self.path.suffix == ".safetensors":
            files = [self.path]
        else:
            raise fail(what, self.path, "is neither a .safetensors file nor a directory "
                       "holding some" if kind in ("file", "dir") else
                       {"missing": "does not exist", "denied": "permission denied",
                        "loop": "symbolic link loop"}.get(kind, "is not a regular file"))
        self.files = files
        self.key_to_file: dict[str, Path] = {}
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        for f in files:
            for k in self._handle_of(f).keys():
                self.key_to_file[k] = f
        self.read_keys: set[str] = set()

    def _handle_of(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except SafetensorError as exc:
                raise _safetensor_error(f"{self.what} shard", f, exc) from None
            except OSError as exc:
                raise fail(f"{self.what} shard", f, describe_os_error(exc)) from None
        return self._handles[f]

    # -- lookups -----------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> list[str]:
        return sorted(self.key_to_file)

    def require(self, key: str) -> None:
        """FileError naming the key (and keys with the same ending) when it is absent."""
        if key not in self.key_to_file:
            tail = ".".join(key.rsplit(".", 2)[-2:])
            near = [k for k in self.key_to_file if k.endswith(tail)]
            raise fail(self.what, self.path, f"has no tensor {key!r}"
                       + (f"; keys with the same ending: {near[:3]}" if near else ""))

    def shape(self, key: str) -> list[int]:
        self.require(key)
        return list(self._handle_of(self.key_to_file[key]).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The stored dtype as safetensors names it (``BF16``, ``F8_E4M3``, ...)."""
        self.require(key)
        return str(self._handle_of(self.key_to_file[key]).get_slice(key).get_dtype())

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str, *index, dtype: torch.dtype | None = None,
            expect_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``tensor[index]`` (basic slices only, or the whole tensor), in ``dtype``.

        ``expect_shape`` is the full (unsliced) shape the model config implies; a mismatch
        is a FileError naming both. A stored dtype outside :data:`WEIGHT_DTYPES` is refused
        (a quantized tensor cast to bf16 would be garbage, not a weight).
        """
        self.require(key)
        f = self.key_to_file[key]
        if expect_shape is not None and tuple(self.shape(key)) != tuple(expect_shape):
            raise fail(self.what, f, f"tensor {key!r} has shape {self.shape(key)}, expected "
                       f"{list(expect_shape)} from the model config; the config and the "
                       "weights do not belong together")
        try:
            h = self._handle_of(f)
            t = h.get_slice(key)[index] if index else h.get_tensor(key)
        except SafetensorError as exc:
            raise _safetensor_error(f"{self.what} shard", f, exc) from None
        if t.dtype not in WEIGHT_DTYPES:
            raise fail(self.what, f, f"tensor {key!r} is stored as {t.dtype}, which this loader "
                       "does not read here (a quantized tensor where the model config expects "
                       "an unquantized one: no fine-grained FP8 quantization_config, or a "
                       "module it does not convert); use a bf16/fp16/fp32 checkpoint or fix "
                       "its quantization_config")
        self.read_keys.add(key)
        return t.to(dtype) if dtype is not None else t

    def get_raw(self, key: str, *index) -> torch.Tensor:
        """``tensor[index]`` in its stored dtype, one of :data:`RAW_DTYPES` (the FP8 loader
        checks which it accepts and names the others)."""
        self.require(key)
        f = self.key_to_file[key]
        try:
            h = self._handle_of(f)
            t = h.get_slice(key)[index] if index else h.get_tensor(key)
        except SafetensorError as exc:
            raise _safetensor_error(f"{self.what} shard", f, exc) from None
        except TypeError as exc:  # a safetensors dtype torch has no type for
            raise fail(self.what, f, f"tensor {key!r} has a dtype torch cannot read ({exc})") \
                from None
        if t.dtype not in RAW_DTYPES:
            raise fail(self.what, f, f"tensor {key!r} is stored as {t.dtype}, which this loader "
                       "does not read")
        self.read_keys.add(key)
        return t

    def rows(self, key: str, start: int, end: int, **kw) -> torch.Tensor:
        """``tensor[start:end]``: the output rows of a column-parallel weight."""
        return self.get(key, slice(start, end), **kw)

    def cols(self, key: str, start: int, end: int, **kw) -> torch.Tensor:
        """``tensor[:, start:end]``: the input columns of a row-parallel weight."""
        return self.get(key, slice(None), slice(start, end), **kw)

    def claim(self, keys) -> None:
        """Count ``keys`` as placed without reading them (another rank reads its slice);
        each must exist."""
        for key in keys:
            self.require(key)
            self.read_keys.add(key)

    def unread(self, ignore=()) -> list[str]:
        """Keys no read has touched (less ``ignore`` predicates): tensors not placed."""
        return sorted(k for k in self.key_to_file
                      if k not in self.read_keys and not any(p(k) for p in ignore))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
