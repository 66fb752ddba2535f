"""Helpers of the family attention tests: a dict-backed stand-in for the checkpoint reader
(same ``get`` / ``rows`` / ``cols`` / ``has`` contract, shapes checked) and the batch and cache
of one or more requests."""

from __future__ import annotations

import torch

from moelora_dist.models.batch import ForwardBatch, KVCache


class DictReader:
    """``SafetensorsReader``'s read API over an in-memory state dict with HF key names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = {k: v.detach() for k, v in tensors.items()}

    def has(self, key: str) -> bool:
        return key in self.t

    def require(self, key: str) -> None:
        assert key in self.t, key

    def shape(self, key: str) -> list[int]:
        return list(self.t[key].shape)

    def dtype_name(self, key: str) -> str:
        return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[
            self.t[key].dtype]

    def get(self, key, *index, dtype=None, expect_shape=None):
        t = self.t[key]
        if expect_shape is not None:
            assert tuple(t.shape) == tuple(expect_shape), (key, t.shape, expect_shape)
        t = t[index] if index else t
        return t.to(dtype) if dtype is not None else t.clone()

    def rows(self, key, start, end, **kw):
        return self.get(key, slice(start, end), **kw)

    def cols(self, key, start, end, **kw):
        return self.get(key, slice(None), slice(start, end), **kw)


def layer_state(module, prefix: str) -> DictReader:
    """A reader of ``module``'s parameters under checkpoint prefix ``prefix``."""
    return DictReader({f"{prefix}.{k}": v for k, v in module.state_dict().items()})


def batch_and_cache(lens: list[int], prefix: list[int], cfg, layers: int, v_dim=None,
                    num_kv=None):
    batch = ForwardBatch.build(lens, prefix, "cpu")
    cache = KVCache(layers, len(lens), max(a + b for a, b in zip(lens, prefix)),
                    num_kv or cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu",
                    v_head_dim=v_dim)
    return batch, cache
