"""Random weights of a named public shape, and random adapters: a server for benchmarks that
needs no checkpoint (``moelora-dist serve --random-weights qwen3-30b-a3b``).

    raw = shape_config("qwen3-30b-a3b", num_layers=48)     # a config.json dict
    adapter = random_adapter("lora0", cfg, rank=16, seed=1)  # CanonicalAdapter, fp32

A random model has no tokenizer: prompts are token ids (``"prompt": [1, 2, 3]``), and outputs
carry token ids (``return_token_ids``) and usage; text is empty. Random adapters put rank-``r``
LoRA on q/k/v/o and on every expert's gate/up/down of every layer (the mix the engine's
benchmarks use), with EOS disabled so every request generates ``max_tokens``.
"""

from __future__ import annotations

import torch

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.config.shapes import SHAPES
from moelora_dist.errors import OptionError


def shape_config(name: str, num_layers: int | None = None) -> dict:
    """The ``config.json`` dict of shape ``name`` (:data:`SHAPES`), ``num_layers`` deep."""
    if name not in SHAPES:
        raise OptionError(f"--random-weights {name!r}: unknown shape; one of {sorted(SHAPES)}")
    raw = dict(SHAPES[name])
    if num_layers is not None:
        if num_layers < 1:
            raise OptionError(f"--num-layers {num_layers}: must be at least 1")
        raw["num_hidden_layers"] = num_layers
    return raw


def random_adapter(name: str, cfg, rank: int, seed: int, device="cpu",
                   dtype: torch.dtype = torch.float32) -> CanonicalAdapter:
    """Rank-``rank`` LoRA on q/k/v/o and every expert projection of every layer (factors
    ~N(0, 0.02^2), scale 2), drawn on ``device`` and kept on the host in ``dtype`` (as a
    loaded checkpoint is): at Qwen3-30B-A3B's full depth one adapter is 0.8 G numbers."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim

    def rn(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype).cpu()

    def f(out_dim, in_dim, e=1):
        return LoRAFactors(rn(e, rank, in_dim), rn(e, out_dim, rank), 2.0)

    dense, moe = {}, {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        dense[f"{p}.q_proj"] = f(cfg.num_heads * D, H)
        dense[f"{p}.k_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.v_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.o_proj"] = f(H, cfg.num_heads * D)
        if layer in cfg.moe_layers:
            moe[layer] = MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")
