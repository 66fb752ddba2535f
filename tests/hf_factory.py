"""Tiny, randomly initialized Hugging Face MoE models and real PEFT adapters, with no downloads.

Used by the tests that check ``moelora_dist`` against an outside reference (HF + PEFT) and by
the model-runner tests. Everything is built from a config in memory::

    model = make_model("qwen3_moe", seed=0)               # Qwen3MoeForCausalLM, fp32, eval mode
    model.save_pretrained(tmp / "model")                  # per-expert checkpoint keys (see below)
    peft_model = make_peft_adapter(model, tmp / "lora", r=4, alpha=8,
                                   target_parameters=EXPERT_PARAMETERS, seed=1)

Sizes are tiny on purpose (hidden 32, expert intermediate 24, 4 experts, top-2, 2 layers,
vocab 128): H != I and H != 2*I so that a transposed or mis-assigned factor changes a shape.

What ``save_pretrained`` writes (transformers 5.23, checked by
``tests/unit/test_hf_parity_moe.py::test_save_pretrained_writes_per_expert_keys``): the
in-memory experts are 3-D parameters ``mlp.experts.gate_up_proj [E, 2I, H]`` and
``mlp.experts.down_proj [E, H, I]``, but the checkpoint is converted back to the per-expert
keys of older releases: ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`` for
Qwen3-MoE and OLMoE, ``model.layers.{l}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` for
Mixtral (see :func:`saved_expert_key_layout`). In memory every architecture, Mixtral included,
calls the block ``mlp``, so PEFT adapter keys read ``...layers.{l}.mlp.experts...``.

PEFT 0.21 rewrites v4-style ``target_modules`` on experts (``gate_proj``/``up_proj``/``down_proj``,
Mixtral ``w1``/``w3``/``w2``) into ``target_parameters`` with rank ``2r`` and alpha ``2*alpha`` on
the fused ``gate_up_proj``, and drops those names from ``target_modules`` (so a dense MLP of the
same model is then not targeted).

The experts run the "eager" implementation: PEFT's ``target_parameters`` LoRA works by
parametrizing the expert parameters, which every implementation reads, but eager is the one
whose arithmetic the reference mirrors line by line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ARCHS = ("qwen3_moe", "mixtral", "olmoe")

# The PEFT ``target_parameters`` that put LoRA on every expert weight of transformers-5 MoE models.
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    # Larger than the HF default 0.02 so that activations and LoRA deltas are O(0.1-1) and a
    # wrong factor moves the output by far more than fp32 noise.
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,  # OLMoE's default 50279 lies outside the tiny vocabulary
)

_ARCH_CONFIG = {
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=4, intermediate_size=24),
    "olmoe": dict(num_experts=4, intermediate_size=24, norm_topk_prob=False,
                  num_key_value_heads=4),
}


def _config_class(arch: str):
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig
    if arch == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def tiny_config(arch: str, **overrides):
    """A tiny HF config of ``arch`` (one of :data:`ARCHS`); keyword arguments override fields."""
    fields = {**_COMMON, **_ARCH_CONFIG.get(arch, {}), **overrides}
    config = _config_class(arch)(**fields)
    config._experts_implementation = "eager"
    return config


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialized ``*ForCausalLM`` of ``arch`` in eval mode (deterministic in ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_model(model, out_dir: str | os.PathLike) -> Path:
    """``model.save_pretrained(out_dir)`` as safetensors; returns the directory."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def num_experts(config) -> int:
    """Experts per MoE layer, whichever field name the architecture uses."""
    n = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return int(n)


def expert_intermediate(config) -> int:
    """The expert intermediate size I (Qwen3-MoE keeps the dense one in ``intermediate_size``)."""
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def moe_block(model, layer: int):
    """The sparse MoE block of decoder layer ``layer`` (works through a PEFT wrapper too)."""
    pattern = re.compile(rf"(^|\.)layers\.{layer}\.(mlp|block_sparse_moe)$")
    for name, module in model.named_modules():
        if pattern.search(name):
            return module
    raise ValueError(f"no MoE block for layer {layer} in {type(model).__name__}")


def unwrapped_experts(block):
    """The experts module of a MoE block with any PEFT ``ParamWrapper`` layers peeled off."""
    experts = block.experts
    while hasattr(experts, "base_layer") and hasattr(experts, "parameter_name"):
        experts = experts.base_layer
    return experts


def saved_expert_key_layout(arch: str) -> tuple[str, dict[str, str]]:
    """``(block name, {gate|up|down: checkpoint projection name})`` of saved per-expert keys."""
    if arch == "mixtral":
        return "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    return "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def make_peft_adapter(
    model,
    out_dir: str | os.PathLike | None = None,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: list[str] | str | None = None,
    target_parameters: list[str] | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    b_std: float = 0.2,
    adapter_name: str = "default",
):
    """Attach a real PEFT LoRA to ``model``, randomize every ``lora_B``, and save it.

    PEFT initializes ``lora_B`` to zero, which would make every adapter a no-op and every
    comparison trivially pass; all LoRA factors here are redrawn from ``N(0, b_std^2)`` with a
    generator seeded by ``seed``. ``lora_dropout`` is 0 (PEFT refuses dropout on parameters).

    Returns the ``PeftModel`` (LoRA active, eval mode). When ``out_dir`` is given the adapter is
    saved there (``adapter_config.json`` + ``adapter_model.safetensors``). ``model`` is modified
    in place by PEFT; build a fresh one for each adapter.
    """
    from peft import LoraConfig, get_peft_model

    if not target_modules and not target_parameters:
        raise ValueError("give target_modules and/or target_parameters")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules if target_modules else [],
        target_parameters=target_parameters,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * b_std)
    peft_model.eval()
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return peft_model


def lora_config_dict(r: int = 4, alpha: float = 8, **fields) -> dict:
    """A minimal ``adapter_config.json`` body for hand-written adapters."""
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "target_modules": [], "bias": "none",
            **fields}


def write_adapter(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  config: dict | None) -> Path:
    """Write a hand-made adapter directory (``config`` None: no ``adapter_config.json``)."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    if config is not None:
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out
