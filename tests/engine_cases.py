"""A tiny random Qwen3-MoE-shaped model, random adapters and a request driver, shared by the
engine tests (no transformers needed: weights from ``RandomWeights``).

    model = tiny_model()                      # fp32, CPU, 2 layers, 8 experts top-2, 3 slots
    engine = Engine(model, EngineConfig(...)); engine.add_adapter("a0", adapter("a0", ...))
    outs = drive(engine, prompts, names, params, arrivals)   # {request id: (ids, logprobs)}
"""

from __future__ import annotations

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.config.model import ModelConfig
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.weights import RandomWeights
from moelora_dist.parallel.groups import ParallelGroups

TINY = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, intermediate_size=48, norm_topk_prob=True,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            max_position_embeddings=256, num_hidden_layers=2)


def adapter(name: str, cfg: ModelConfig, rank: int, seed: int, std: float = 0.3):
    """Rank-``rank`` LoRA on q/k/v/o and every expert of every layer (scaled to matter)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 1.0)  # noqa: E731
    dense = {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        for m, o, i in (("q_proj", cfg.num_heads * D, H), ("k_proj", cfg.num_kv_heads * D, H),
                        ("v_proj", cfg.num_kv_heads * D, H), ("o_proj", H, cfg.num_heads * D)):
            dense[f"{p}.{m}"] = f(o, i)
    moe = {layer: MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
           for layer in range(cfg.num_layers)}
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")


def tiny_model(max_loras: int = 3, device="cpu", dtype=torch.float32, **overrides):
    cfg = ModelConfig.from_dict(dict(TINY, **overrides))
    return MoELoRAModel.build(cfg, ParallelGroups.single(device), RandomWeights(
        cfg, dtype, device, seed=0, std=0.1), dtype=dtype, max_loras=max_loras, max_rank=8,
        progress=False)


def drive(engine, prompts, names, params, arrivals=None, each_step=None):
    """Add request ``i`` at step ``arrivals[i]`` (default all at 0) and step until done.

    Returns ``{i: (token ids, chosen-token logprobs or [], finish reason)}``; ``each_step``
    is called after every step (invariant checks)."""
    arrivals = arrivals or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    done: dict[int, tuple[list, list, str | None]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(str(i), prompts[i], params[i], names[i])
        for out in engine.step():
            ids, lps, _ = done.setdefault(int(out.request_id), ([], [], None))
            ids.extend(out.new_token_ids)
            lps.extend(lp.logprob for lp in out.logprobs or [])
            if out.finished:
                done[int(out.request_id)] = (ids, lps, out.finish_reason)
        if each_step is not None:
            each_step()
        step += 1
    return done
