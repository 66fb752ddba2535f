"""Read slices of a Hugging Face safetensors checkpoint directory, one rank's part at a time.

A directory holds ``model.safetensors``, or shards listed in ``model.safetensors.index.json``
(``{"weight_map": {key: file}}``), or shards without an index. Every ``*.safetensors`` file is
scanned for its keys (headers only), which covers both cases; the index is checked for missing
shards. Tensors are read with ``safe_open(...).get_slice`` so a rank materializes only the rows /
columns / experts it owns. Only safetensors: pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from moelora_dist.moe.weights import SafetensorsIndex


class CheckpointError(ValueError):
    """A checkpoint directory the runner cannot read; the message names what is missing."""


class CheckpointReader:
    """Sliced, shape-checked reads from a checkpoint directory.

    A thin layer over :class:`moelora_dist.moe.weights.SafetensorsIndex` (shared with the MoE
    expert loader, so each file is opened once): it adds the model-directory checks and reads
    that name the config field a wrong shape contradicts. Use as a context manager.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        if not os.path.isdir(model_dir):
            raise CheckpointError(f"model directory {model_dir} does not exist")
        files = glob.glob(os.path.join(model_dir, "*.safetensors"))
        if not files:
            pickled = [os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*"))
                       if p.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (found pickled weights {pickled}: they are never unpickled; convert them "
                    "to safetensors in a trusted environment with save_pretrained)"
                    if pickled else "")
            raise CheckpointError(f"no *.safetensors files in {model_dir}{hint}")
        index_json = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_json):
            with open(index_json) as f:
                listed = set(json.load(f).get("weight_map", {}).values())
            missing = sorted(n for n in listed if not os.path.isfile(os.path.join(model_dir, n)))
            if missing:
                raise CheckpointError(f"{index_json} lists shards that are missing: {missing}")
        self.index = SafetensorsIndex(model_dir)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has(self, key: str) -> bool:
        return key in self.index

    def shape(self, key: str) -> list[int]:
        self._require(key)
        return self.index.shape(key)

    def _require(self, key: str) -> None:
        if key not in self.index:
            tail = ".".join(key.rsplit(".", 2)[-2:])
            near = [k for k in self.index.key_to_file if k.endswith(tail)]
            raise CheckpointError(
                f"checkpoint {self.model_dir} has no tensor {key!r}"
                + (f"; keys with the same ending: {near[:3]}" if near else ""))

    def get(self, key: str, *index, dtype: torch.dtype | None = None,
            expect_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read ``tensor[index]`` (basic slices only), checking the full shape first.

        ``expect_shape`` is the full (unsliced) shape the model config implies; a mismatch is a
        :class:`CheckpointError` naming both, not a confusing failure later.
        """
        self._require(key)
        if expect_shape is not None and tuple(self.index.shape(key)) != tuple(expect_shape):
            raise CheckpointError(
                f"{key} has shape {tuple(self.index.shape(key))} but config.json implies "
                f"{tuple(expect_shape)}; the config and the weights do not belong together")
        t = self.index.get_slice(key, index) if index else self.index.get(key)
        return t.to(dtype) if dtype is not None else t

    def rows(self, key: str, start: int, end: int, **kw) -> torch.Tensor:
        """``tensor[start:end]``: the output rows of a column-parallel weight."""
        return self.get(key, slice(start, end), **kw)

    def cols(self, key: str, start: int, end: int, **kw) -> torch.Tensor:
        """``tensor[:, start:end]``: the input columns of a row-parallel weight."""
        return self.get(key, slice(None), slice(start, end), **kw)
