"""Read one rank's slice of a MoE layer's base weights from a checkpoint, and nothing more.

Legend: E experts, E_l local experts, H hidden, I intermediate, I_l local intermediate,
X = 2 I_l (the rank's gate rows, then its up rows).

Each rank reads only its experts and its ``I`` rows/columns through the reader's sliced
reads; the full expert tensors are never materialized. Accepted key layouts under a layer
prefix such as ``model.layers.3.mlp``:

    fused 3-D (transformers 5):  {p}.experts.gate_up_proj [E, 2I, H]   (gate rows, then up)
                                 {p}.experts.down_proj    [E, H, I]
    per expert (Qwen3-MoE, OLMoE): {p}.experts.{e}.gate_proj.weight [I, H], up_proj [I, H],
                                 down_proj [H, I]
    per expert (Mixtral):        {p}.experts.{e}.w1.weight (gate), w3 (up), w2 (down)
    router:                      {p}.gate.weight [E, H]
    DeepSeek-V3 / GLM-4.5:       + {p}.gate.e_score_correction_bias [E] (fp32, selection only)
    gpt-oss (layout "interleaved", :mod:`.moe_weights_oss`): {p}.router.{weight,bias},
                                 experts.gate_up_proj [E, H, 2I] interleaved, biases, MXFP4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora_dist.files.paths import fail
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.parallel.layout import MoEShard

PER_EXPERT_NAMES = {  # style -> (gate, up, down) module names under experts.{e}
    "per_expert": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}


@dataclass
class RankMoEWeights:
    """``router_EH [E, H]``, ``w_gate_up [E_l, X, H]``, ``w_down [E_l, H, I_l]``; the
    optional family tensors: ``router_bias_E``, ``correction_bias_E`` (fp32),
    ``b_gate_up [E_l, X]``, ``b_down [E_l, H]``; ``mxfp4_values``: expert weights that were
    stored as MXFP4 (0: none)."""

    router_EH: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    key_style: str
    router_bias_E: torch.Tensor | None = None
    correction_bias_E: torch.Tensor | None = None
    b_gate_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    mxfp4_values: int = 0


def detect_key_style(reader: SafetensorsReader, prefix: str) -> str:
    """``fused``, ``per_expert`` or ``mixtral``, from the keys present under ``prefix``."""
    if f"{prefix}.experts.gate_up_proj" in reader:
        return "fused"
    for style, (gate, _, _) in PER_EXPERT_NAMES.items():
        if f"{prefix}.experts.0.{gate}.weight" in reader:
            return style
    near = sorted(k for k in reader.key_to_file if k.startswith(prefix))[:5]
    raise fail(reader.what, reader.path, f"no MoE expert weights under prefix {prefix!r}: expected "
               f"{prefix}.experts.gate_up_proj, {prefix}.experts.0.gate_proj.weight or "
               f"{prefix}.experts.0.w1.weight; keys under the prefix: {near or 'none'}")


def load_moe_weights(reader: SafetensorsReader, prefix: str, shard: MoEShard, *, hidden: int,
                     router_key: str | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", layout: str = "standard",
                     correction_bias: bool = False,
                     router_dtype: torch.dtype | None = None) -> RankMoEWeights:
    """This rank's slice of the MoE layer under ``prefix`` (see the module docstring).

    ``shard`` comes from ``RankLayout.moe_shard(E, I)``; ``router_key`` defaults to
    ``{prefix}.gate.weight`` (``{prefix}.router.weight`` for ``layout="interleaved"``, the
    gpt-oss experts). ``correction_bias``: read ``{prefix}.gate.e_score_correction_bias``.
    ``router_dtype``: the router's dtype (fp32 for DeepSeek-V3 / GLM-4.5), else ``dtype``.
    Missing keys and shapes that do not match ``(E, H, I)`` raise
    :class:`~moelora_dist.errors.FileError` naming the key.
    """
    E, I, H = shard.num_experts, shard.intermediate, hidden
    experts, i_cols = shard.expert_slice, shard.i_slice
    gate_rows, up_rows = shard.gate_up_slices
    move = dict(device=device)
    if layout == "interleaved":
        from moelora_dist.models.moe_weights_oss import is_mxfp4, load_oss_experts

        router = reader.get(router_key or f"{prefix}.router.weight", expect_shape=(E, H))
        r_bias = reader.get(f"{prefix}.router.bias", expect_shape=(E,))
        gate_up, down, b_gu, b_d, n_q = load_oss_experts(reader, prefix, shard, hidden=H,
                                                         dtype=dtype)
        router, r_bias = (t.to(device=device, dtype=router_dtype or dtype or t.dtype)
                          for t in (router, r_bias))
        return RankMoEWeights(router.contiguous(), gate_up.to(**move), down.to(**move),
                              "mxfp4" if is_mxfp4(reader, prefix) else "gpt_oss",
                              router_bias_E=r_bias, b_gate_up=b_gu.to(**move),
                              b_down=b_d.to(**move), mxfp4_values=n_q)
    router = reader.get(router_key or f"{prefix}.gate.weight", expect_shape=(E, H))
    corr = (reader.get(f"{prefix}.gate.e_score_correction_bias", expect_shape=(E,),
                       dtype=torch.float32).to(device) if correction_bias else None)
    style = detect_key_style(reader, prefix)
    if style == "fused":
        gu_key, d_key = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        gate_up = torch.cat([reader.get(gu_key, experts, gate_rows, expect_shape=(E, 2 * I, H)),
                             reader.get(gu_key, experts, up_rows)], dim=1)
        down = reader.get(d_key, experts, slice(None), i_cols, expect_shape=(E, H, I))
    else:
        g_name, u_name, d_name = PER_EXPERT_NAMES[style]
        gus, downs = [], []
        for e in range(shard.expert_start, shard.expert_end):
            base = f"{prefix}.experts.{e}"
            gate = reader.get(f"{base}.{g_name}.weight", i_cols, expect_shape=(I, H))
            up = reader.get(f"{base}.{u_name}.weight", i_cols, expect_shape=(I, H))
            gus.append(torch.cat([gate, up], dim=0))
            downs.append(reader.get(f"{base}.{d_name}.weight", slice(None), i_cols,
                                    expect_shape=(H, I)))
        gate_up, down = torch.stack(gus), torch.stack(downs)
        # The other ranks place the other experts: account for every expert's keys here, so
        # that any key left over is one no rank places (refused by the model loader).
        reader.claim(f"{prefix}.experts.{e}.{n}.weight" for e in range(E)
                     for n in (g_name, u_name, d_name))
    router = router.to(device=device, dtype=router_dtype or dtype or router.dtype).contiguous()
    out = [t.to(device=device, dtype=dtype or t.dtype).contiguous() for t in (gate_up, down)]
    return RankMoEWeights(router, *out, key_style=style, correction_bias_E=corr)
