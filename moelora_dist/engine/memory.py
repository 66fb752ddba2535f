"""How many KV pages a rank gets: sized from the device memory left after the weights, the LoRA
pool and the activations of the largest step, and the same on every rank of the TP group.

On CUDA: one forward of ``max_num_batched_tokens`` tokens (random ids, sequences of at most
``max_model_len``) with the LM head and log-softmax of ``max_num_seqs`` rows measures the
activation peak; then ``pages = (gpu_memory_utilization * total - peak - memory held outside
torch's allocator - graph reserve) / bytes per page``. The reserve covers the CUDA graphs'
private pool. The TP group takes the minimum over its ranks. On a CPU: ``num_pages`` or
:data:`~.config.CPU_DEFAULT_TOKENS` tokens of pages (at least one longest sequence).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from moelora_dist.engine.config import CPU_DEFAULT_TOKENS, EngineConfig
from moelora_dist.errors import OptionError
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch

log = logging.getLogger(__name__)
GRAPH_RESERVE_BYTES = 1 << 30


@torch.no_grad()
def profile_peak(model, config: EngineConfig, max_model_len: int) -> int:
    """Peak device bytes allocated by one largest step (see the module docstring)."""
    dev, S = model.device, config.page_size
    T = config.max_num_batched_tokens
    L = min(T, max_model_len)
    lens = [L] * (T // L) + ([T % L] if T % L else [])
    pages_each = -(-L // S)
    cache = model.new_cache(pages_each * len(lens), S)
    tables = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(len(lens))]
    batch = ForwardBatch.build(lens, [0] * len(lens), tables, S, dev)
    ids = torch.randint(0, model.cfg.vocab_size, (T,), device=dev)
    info = build_batch_info(batch.seg_indptr_B1, torch.full((len(lens),), -1, device=dev),
                            model.pool.slot_rank_S, backend=model.backend, validate=False,
                            num_tokens=T, num_lora_tokens=0)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    hidden = model.forward(ids, batch, cache, info)
    rows = min(config.max_num_seqs, T)
    torch.log_softmax(model.logits(hidden[:rows]), dim=-1)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del cache, hidden
    torch.cuda.empty_cache()
    return peak


def plan_pages(model, config: EngineConfig, max_model_len: int) -> int:
    """Pages of the pool on this rank's TP group (module docstring); logs the decision."""
    groups, S = model.groups, config.page_size
    page_bytes = model.page_bytes(S)
    need = config.pages_for(max_model_len)
    if config.num_pages is not None:
        pages = config.num_pages
    elif model.device.type != "cuda":
        pages = max(need, CPU_DEFAULT_TOKENS // S)
    else:
        peak = profile_peak(model, config, max_model_len)
        free, total = torch.cuda.mem_get_info(model.device)
        outside = total - free - torch.cuda.memory_reserved(model.device)
        budget = config.gpu_memory_utilization * total - peak - outside - GRAPH_RESERVE_BYTES
        pages = int(max(0, budget) // page_bytes)
        if groups.is_rank0:
            log.info("memory: %.1f GiB total, %.1f GiB peak of a %d-token step (weights, "
                     "LoRA pool, activations), %.1f GiB outside torch", total / 2**30,
                     peak / 2**30, config.max_num_batched_tokens, outside / 2**30)
    if groups.tp_group is not None and groups.tp_size > 1:
        t = torch.tensor([pages], dtype=torch.int64, device=groups.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.tp_group)
        pages = int(t)
    if pages < need and config.num_pages is None:  # explicit pools: checked per request
        raise OptionError(
            f"the KV cache gets {pages} pages of {S} tokens, fewer than one sequence of "
            f"max_model_len={max_model_len} needs ({need}); raise --gpu-memory-utilization or "
            "--num-pages, or lower --max-model-len / --max-num-batched-tokens")
    if groups.is_rank0:
        log.info("KV cache: %d pages x %d tokens = %d tokens, %.2f GiB per rank (%.1f KiB "
                 "per page)", pages, S, pages * S, pages * page_bytes / 2**30, page_bytes / 1024)
    return pages
