"""A built-in tiny MoE model and adapters, for the sweep and the distributed tests.

Legend: T tokens, H hidden, E experts, I intermediate, r LoRA rank.

The checkpoint is written to safetensors with a different key layout per layer (fused 3-D,
Qwen-style per expert, Mixtral ``w1/w3/w2``, gpt-oss's interleaved experts) so that every
layout the weight loader accepts is read back, sliced per rank, on every run; the layers also
differ in router and expert variant (:mod:`.tiny_variants`: DeepSeek-V3's grouped sigmoid
router on layer 1, gpt-oss's biased, clamped experts on layer 3). The stack is ``x <- x + moe(rms_norm(x))`` per
layer: enough to carry one layer's error into the next. The adapters mix the forms the pool
must serve: per-expert, shared-outer, gate/up sharing one ``A``, different ranks, and layers
an adapter does not target. Everything is generated from a seed, so every rank builds the
same model and adapters without talking to the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.lora.batch_info import BatchInfo, build_batch_info
from moelora_dist.lora.pool import LoRAPool, MoELayerSpec, PoolConfig
from moelora_dist.models.moe_weights import load_moe_weights
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.testing import tiny_variants as variants

KEY_STYLES = ("fused", "per_expert", "mixtral")


@dataclass
class TinyMoEConfig:
    hidden: int = 32
    intermediate: int = 16
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 3
    renormalize: bool = True
    activation: str = "silu"
    seed: int = 0
    variants: bool = True  # the family variants of :mod:`.tiny_variants` by layer

    def prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_checkpoint(cfg: TinyMoEConfig) -> dict[str, torch.Tensor]:
    """Full fp32 weights keyed as a Hugging Face checkpoint; layer ``l`` uses
    ``KEY_STYLES[l % 3]`` (gpt-oss's layout for an ``oss`` variant layer). Scales keep
    activations O(1) through the stack."""
    g = _gen(cfg.seed)
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    out = {}
    for layer in range(cfg.num_layers):
        p = cfg.prefix(layer)
        out[f"{p}.gate.weight"] = torch.randn(E, H, generator=g)
        gu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
        down = torch.randn(E, H, I, generator=g) / I ** 0.5
        extras = variants.draw_extras(cfg, layer, g)
        style = KEY_STYLES[layer % len(KEY_STYLES)]
        if variants.variant_of(cfg, layer) == "oss":
            out.update(variants.oss_keys(p, out.pop(f"{p}.gate.weight"), gu, down, extras))
            continue
        if "correction_bias" in extras:
            out[f"{p}.gate.e_score_correction_bias"] = extras["correction_bias"]
        if style == "fused":
            out[f"{p}.experts.gate_up_proj"] = gu
            out[f"{p}.experts.down_proj"] = down
        else:
            names = ("gate_proj", "up_proj", "down_proj") if style == "per_expert" else (
                "w1", "w3", "w2")
            for e in range(E):
                out[f"{p}.experts.{e}.{names[0]}.weight"] = gu[e, :I].clone()
                out[f"{p}.experts.{e}.{names[1]}.weight"] = gu[e, I:].clone()
                out[f"{p}.experts.{e}.{names[2]}.weight"] = down[e].clone()
    return out


def full_weights(cfg: TinyMoEConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Unsliced ``router [E, H]``, ``gate_up [E, 2I, H]``, ``down [E, H, I]`` of one layer
    (a classic or grouped one: the layouts this reads back)."""
    ckpt = make_checkpoint(cfg)
    p, I = cfg.prefix(layer), cfg.intermediate
    if f"{p}.experts.gate_up_proj" in ckpt:
        return ckpt[f"{p}.gate.weight"], ckpt[f"{p}.experts.gate_up_proj"], ckpt[
            f"{p}.experts.down_proj"]
    names = ("gate_proj", "up_proj", "down_proj") if f"{p}.experts.0.gate_proj.weight" in ckpt \
        else ("w1", "w3", "w2")
    E = cfg.num_experts
    gu = torch.stack([torch.cat([ckpt[f"{p}.experts.{e}.{names[0]}.weight"],
                                 ckpt[f"{p}.experts.{e}.{names[1]}.weight"]]) for e in range(E)])
    down = torch.stack([ckpt[f"{p}.experts.{e}.{names[2]}.weight"] for e in range(E)])
    assert gu.shape[1] == 2 * I
    return ckpt[f"{p}.gate.weight"], gu, down


def save_checkpoint(cfg: TinyMoEConfig, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in make_checkpoint(cfg).items()},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "moelora_tiny", **asdict(cfg)}))
    return d


def _factors(g, num_a: int, num_b: int, r: int, out_dim: int, in_dim: int,
             alpha: float) -> LoRAFactors:
    a = torch.randn(num_a, r, in_dim, generator=g) / in_dim ** 0.5
    b = 0.5 * torch.randn(num_b, out_dim, r, generator=g) / r ** 0.5
    return LoRAFactors(a, b, alpha / r)


def make_adapters(cfg: TinyMoEConfig) -> list[CanonicalAdapter]:
    """Four adapters of different forms and ranks (see the module docstring)."""
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    layers = range(cfg.num_layers)
    out = []
    g = _gen(cfg.seed + 1)
    out.append(CanonicalAdapter("per_expert_r4", {l: MoELayerLoRA(
        E, _factors(g, E, E, 4, I, H, 8), _factors(g, E, E, 4, I, H, 8),
        _factors(g, E, E, 4, H, I, 8)) for l in layers}, format="tiny"))
    out.append(CanonicalAdapter("shared_outer_r8", {l: MoELayerLoRA(
        E, _factors(g, 1, E, 8, I, H, 16), _factors(g, 1, E, 8, I, H, 16),
        _factors(g, E, 1, 8, H, I, 16)) for l in layers if l != 1}, format="tiny"))
    shared_a = {}
    for l in layers:
        gate = _factors(g, E, E, 2, I, H, 4)
        up = LoRAFactors(gate.a, torch.randn(E, I, 2, generator=g) / 2 ** 0.5, 4 / 2)
        shared_a[l] = MoELayerLoRA(E, gate, up, None)  # gate and up share A; down untargeted
    out.append(CanonicalAdapter("gate_up_shared_a_r2", shared_a, format="tiny"))
    out.append(CanonicalAdapter("down_only_r6", {
        0: MoELayerLoRA(E, None, None, _factors(g, E, E, 6, H, I, 6))}, format="tiny"))
    return out


def rms_norm(x_TH: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x_TH.float() if x_TH.dtype != torch.float64 else x_TH
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x_TH.dtype)


class TinyMoEStack(nn.Module):
    """``x <- x + layer(rms_norm(x))`` over a list of :class:`LoRAMoE` layers."""

    def __init__(self, layers: list[LoRAMoE]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x_TH: torch.Tensor, batch_info: BatchInfo | None = None) -> torch.Tensor:
        """``x_TH [T, H]`` -> ``[T, H]``, same dtype, on every TP rank."""
        for layer in self.layers:
            x_TH = x_TH + layer(rms_norm(x_TH), batch_info)
        return x_TH


def load_stack(cfg: TinyMoEConfig, checkpoint: str | Path, groups: ParallelGroups, pool,
               *, dispatcher: str = "auto", dtype: torch.dtype = torch.float32) -> TinyMoEStack:
    """Build the stack reading only this rank's slices of ``checkpoint`` (safetensors)."""
    shard = groups.rank_layout.moe_shard(cfg.num_experts, cfg.intermediate)
    layers = []
    with SafetensorsReader(checkpoint) as reader:
        for layer in range(cfg.num_layers):
            v = variants.variant_of(cfg, layer)
            fp32 = v == "grouped"  # DeepSeek-V3 / GLM-4.5 keep the router in fp32
            w = load_moe_weights(reader, cfg.prefix(layer), shard, hidden=cfg.hidden,
                                 dtype=dtype, device=groups.device,
                                 layout="interleaved" if v == "oss" else "standard",
                                 correction_bias=v == "grouped",
                                 router_dtype=torch.float32 if fp32 else None)
            base = MoEBlock(w.router_EH, w.w_gate_up, w.w_down, top_k=cfg.top_k,
                            renormalize=cfg.renormalize, shard=shard,
                            activation=variants.activation(cfg, layer),
                            router=variants.router_spec(cfg, layer),
                            router_bias_E=w.router_bias_E, correction_bias_E=w.correction_bias_E,
                            b_gate_up=w.b_gate_up, b_down=w.b_down, router_fp32=fp32)
            layers.append(LoRAMoE(base, pool, layer, groups, dispatcher))
    return TinyMoEStack(layers)


def make_pool(cfg: TinyMoEConfig, rank_layout, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", max_loras: int = 4, max_rank: int = 8):
    """A :class:`~moelora_dist.lora.pool.LoRAPool` sized for the tiny model on one rank."""
    spec = MoELayerSpec(cfg.num_experts, cfg.hidden, cfg.intermediate)
    return LoRAPool(PoolConfig(max_loras=max_loras, max_rank=max_rank, dtype=dtype,
                               device=device), rank_layout,
                    moe_layers={layer: spec for layer in range(cfg.num_layers)})


def make_requests(cfg: TinyMoEConfig, num_tokens: int, adapter_names: list[str | None],
                  seed: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu"):
    """Random tokens ``x_TH [T, H]`` cut into one request per entry of ``adapter_names``
    (None = base model) at random boundaries; returns ``(x_TH, seg_indptr_B1 [B+1])``."""
    g = _gen(seed)
    x_TH = torch.randn(num_tokens, cfg.hidden, generator=g).to(dtype=dtype, device=device)
    B = len(adapter_names)
    cuts = torch.sort(torch.randint(0, num_tokens + 1, (B - 1,), generator=g)).values
    seg = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([num_tokens])])
    return x_TH, seg.to(torch.int32).to(device)


def batch_info_for(pool, names: list[str | None], registry: dict, seg_indptr_B1):
    """Pin the batch's adapters in ``pool`` and expand them to per-token slots."""
    req_to_slot_B = pool.prepare_batch(names, registry)
    return build_batch_info(seg_indptr_B1, req_to_slot_B.to(seg_indptr_B1.device),
                              pool.slot_rank_S.to(seg_indptr_B1.device))
