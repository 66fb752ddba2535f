"""One rank's slice of a MoE layer whose experts are stored in block FP8.

Legend: E experts, E_l local experts, H hidden, I intermediate, I_l local intermediate,
X = 2 I_l (the rank's gate rows, then its up rows).

Key layouts as in :mod:`.moe_weights`, each weight with its scales beside it:

    per expert:  {p}.experts.{e}.gate_proj.weight [I, H] e4m3 + .weight_scale_inv [ceil(I/128),
                 ceil(H/128)]; up_proj likewise; down_proj [H, I] + [ceil(H/128), ceil(I/128)]
                 (Mixtral: w1 / w3 / w2)
    fused 3-D:   {p}.experts.gate_up_proj [E, 2I, H] + gate_up_proj_scale_inv
                 [E, ceil(2I/128), ceil(H/128)]; down_proj [E, H, I] + down_proj_scale_inv

EP takes whole experts; MoE-TP takes ``I`` rows of gate and up (the scale rows are re-blocked
with them: :func:`.fp8_weights.reblock_rows`) and the same ``I`` columns of down with their
scale columns, which needs ``I_l`` to be a multiple of 128 when ``moe_tp > 1`` (checked for the
layout before any group is built: :mod:`.fp8_layout`). The router stays unquantized.
"""

from __future__ import annotations

import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.models.fp8_weights import maybe_dequantize, read_block_fp8, stored_fp8
from moelora_dist.models.moe_weights import PER_EXPERT_NAMES, RankMoEWeights, detect_key_style
from moelora_dist.parallel.layout import MoEShard


def experts_stored_fp8(reader, cfg: ModelConfig, prefix: str) -> bool:
    """Whether the experts under ``prefix`` are FP8 (refusals as in :func:`stored_fp8`)."""
    style = detect_key_style(reader, prefix)
    if style == "fused":
        return stored_fp8(reader, cfg, f"{prefix}.experts.gate_up_proj")
    return stored_fp8(reader, cfg, f"{prefix}.experts.0.{PER_EXPERT_NAMES[style][0]}")


def _stack(parts: list[BlockFP8Weight]) -> BlockFP8Weight:
    block_n = {p.block_n for p in parts}
    assert len(block_n) == 1, block_n  # every expert is cut the same way
    return BlockFP8Weight(torch.stack([p.weight for p in parts]),
                          torch.stack([p.scale_inv for p in parts]), block_n.pop())


def load_moe_weights_fp8(reader, cfg: ModelConfig, prefix: str, shard: MoEShard, *,
                         hidden: int, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> RankMoEWeights:
    """This rank's router ``[E, H]`` (in ``dtype``) and its FP8 experts:
    ``w_gate_up`` ``[E_l, X, H]`` and ``w_down`` ``[E_l, H, I_l]`` as :class:`BlockFP8Weight`
    (tensors in ``dtype`` when ``cfg.fp8.dequantize``)."""
    E, I, H = shard.num_experts, shard.intermediate, hidden
    router = reader.get(f"{prefix}.gate.weight", expect_shape=(E, H), dtype=dtype)
    style = detect_key_style(reader, prefix)
    g, u = shard.gate_up_slices
    cols = (shard.i_start, shard.i_end)
    if style == "fused":
        experts = (shard.expert_slice,)
        gu_key = f"{prefix}.experts.gate_up_proj"
        gate_up = read_block_fp8(reader, cfg, [(gu_key, g.start, g.stop), (gu_key, u.start, u.stop)],
                                 lead=experts, expect_shape=(2 * I, H))
        down = read_block_fp8(reader, cfg, [(f"{prefix}.experts.down_proj", None, None)],
                              lead=experts, cols=cols, expect_shape=(H, I))
    else:
        gn, un, dn = PER_EXPERT_NAMES[style]
        gus, downs = [], []
        for e in range(shard.expert_start, shard.expert_end):
            base = f"{prefix}.experts.{e}"
            gus.append(read_block_fp8(reader, cfg, [(f"{base}.{gn}", g.start, g.stop),
                                                    (f"{base}.{un}", g.start, g.stop)],
                                      expect_shape=(I, H)))
            downs.append(read_block_fp8(reader, cfg, [(f"{base}.{dn}", None, None)], cols=cols,
                                        expect_shape=(H, I)))
        gate_up, down = _stack(gus), _stack(downs)
        # Other ranks place the other experts: every expert's weights and scales count as
        # placed, so a key left over is one that no rank places (refused by the model loader).
        reader.claim(f"{prefix}.experts.{e}.{n}.{t}" for e in range(E) for n in (gn, un, dn)
                     for t in ("weight", "weight_scale_inv"))
    gate_up, down = (maybe_dequantize(w, cfg, dtype) for w in (gate_up, down))
    out = [t.to_device(device) if isinstance(t, BlockFP8Weight) else t.to(device).contiguous()
           for t in (router, gate_up, down)]
    return RankMoEWeights(*out, key_style=style)
