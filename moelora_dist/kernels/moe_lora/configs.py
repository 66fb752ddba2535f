"""Tile sizes of the Triton MoE LoRA pipeline, chosen from the shapes of a call.

Chosen once per batch (the layer asks with the batch's token count), never per kernel launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from moelora_dist.kernels.constants import block_r


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of one call; ``block_m`` rows per expert block (base) / LoRA block."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    lora_block_m: int = 16
    down_block_n: int = 128
    shrink_block_k: int = 128
    # LoRA expand of gate_up and down: a loop over the block's slot runs (lora_runs of them
    # stacked per dot, a power of two), or one slot at a time. H100, Qwen3, 8 adapters r16
    # (docs/kernels.md): at T=64 (16-row tiles) the whole layer took 0.488 ms in a graph with
    # the run loop and 2 runs per dot, 0.496 with 1 run, 0.514 with the slot loop; at T=4096
    # (128x128 tiles) the run loop made the down kernel take 592 us against 390 us, so
    # pick_config keeps the slot loop there.
    run_loop: bool = True
    lora_runs: int = 2
    # down_shrink: 0 = one slot at a time (h re-read per slot), n = n runs stacked per dot,
    # -1 = as many as make 64 columns (4 at rank 16).
    down_shrink_runs: int = -1

    def down_shrink_runs_for(self, max_rank: int) -> int | None:
        """The down shrink's runs per dot (None: its one-slot-at-a-time kernel)."""
        if self.down_shrink_runs >= 0:
            return self.down_shrink_runs or None
        return max(1, 64 // block_r(max_rank))


@functools.lru_cache(maxsize=1024)
def pick_config(num_tokens: int, top_k: int, num_experts: int, num_slots: int = 1) -> MoEConfig:
    """Tiles by the average rows per expert: small blocks for decode, large for prefill.

    Cached: every MoE layer of a forward asks with the same sizes, so the choice is made once
    per batch shape, not once per layer."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    per_virtual = per_expert / max(num_slots, 1)
    # LoRA shrink blocks: H100, T=4096 (32 rows per slot and expert), 32 rows per block took
    # 65 us against 92 us for 16 (A read by fewer blocks); 16 and 32 tie at T=64.
    lora_bm = 16 if per_virtual < 16 else (32 if per_virtual <= 64 else 64)
    if per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4,
                         lora_block_m=lora_bm, down_block_n=64)
    if per_expert <= 128:
        return MoEConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4,
                         lora_block_m=lora_bm, down_block_n=64)
    # H100, Qwen3 shapes, T=4096 (256 rows per expert): 128x128 tiles with 8 warps took 0.87
    # ms against 1.04 ms for 64x128 with 4 warps; the LoRA expand loops one slot at a time.
    return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3,
                     lora_block_m=lora_bm, down_block_n=128, run_loop=False)
