"""Helpers of the family attention tests: a dict-backed stand-in for the checkpoint reader
(same ``get`` / ``rows`` / ``cols`` / ``has`` contract, shapes checked) and the paged batch and
cache of one or more requests (pages in a shuffled order, unwritten slots NaN)."""

from __future__ import annotations

import torch

from moelora_dist.models.batch import ForwardBatch, PagedKVCache

PAGE_SIZE = 4


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


def block_tables(max_lens: list[int], page_size: int = PAGE_SIZE, seed: int = 0):
    """Pages for sequences of up to ``max_lens[b]`` tokens, taken from a shuffled pool (so
    that a layer reading by position instead of through its table is caught), and the pool
    size."""
    need = [-(-n // page_size) for n in max_lens]
    num_pages = sum(need) + 2
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    return tables, num_pages


def poisoned_cache(layers: int, num_pages: int, num_kv: int, head_dim: int,
                   page_size: int = PAGE_SIZE) -> PagedKVCache:
    """A paged fp32 CPU cache whose every slot is NaN until a layer writes it: a read of a
    slot no request owns turns the output NaN."""
    cache = PagedKVCache(layers, num_pages, page_size, num_kv, head_dim, torch.float32, "cpu")
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    return cache


def batch_and_cache(lens: list[int], prefix: list[int], layers: int, num_kv: int,
                    head_dim: int, max_lens: list[int] | None = None):
    """The first forward of requests adding ``lens`` tokens after ``prefix`` cached ones, a
    poisoned cache with room for ``max_lens`` tokens each, and their block tables (for the
    next steps: ``ForwardBatch.build(new, prefix, tables, PAGE_SIZE, "cpu")``)."""
    tables, num_pages = block_tables(max_lens or [a + b for a, b in zip(lens, prefix)])
    batch = ForwardBatch.build(lens, prefix, tables, PAGE_SIZE, "cpu")
    return batch, poisoned_cache(layers, num_pages, num_kv, head_dim), tables
