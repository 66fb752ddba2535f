"""Tile sizes and loop switches of the Triton MoE LoRA pipeline, chosen from the shapes of a call.

Legend: T tokens, H hidden, E_l local experts, I_l local intermediate, K top-k, S slots, BR
the rank tile (:func:`~moelora_dist.kernels.constants.block_r`).

:func:`pick_config` answers once per batch shape (cached; the layer asks with the batch's
token count), never per kernel launch: first from a tuned file for this device, shape and dtype
(``tuned.py``; files in ``tuned/`` written by ``moelora-dist tune-kernels``), nearest tuned
token count; where no file matches, from :func:`heuristic_config`, a table fitted by hand on
H100 runs. ``docs/tuning.md`` describes each switch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from moelora_dist.errors import OptionError
from moelora_dist.kernels.constants import block_r


def _pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


@dataclass(frozen=True)
class MoEConfig:
    """Tiles and switches of one call. Base GEMMs: ``block_m`` rows per expert block (the base
    alignment), gate_up ``block_n x block_k`` tiles, down ``down_block_n x down_block_k``
    (``down_*`` None: as gate_up). LoRA: see ``docs/tuning.md``; every combination computes the
    same result (the tests pin each against the reference), only the speed differs."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    down_block_n: int = 128
    down_block_k: int | None = None
    down_num_warps: int | None = None
    down_num_stages: int | None = None
    # Program order of gate_up and down (kernels/moe_gemm/kernel_common._tile_of): groups of
    # group_m row blocks, the row block fastest inside a group. 1: each block sweeps all its
    # column tiles before the next block starts, so an expert with more rows than one block
    # reads its weights from HBM once per block; in a group the blocks of an expert read each
    # weight tile side by side (the second read hits L2). Same result for every value.
    group_m: int = 1
    # LoRA shrink of gate_up in its own kernel: blocks of lora_block_m rows of one (slot,
    # expert), K tiles of shrink_block_k, H split over shrink_split_k programs (partial sums
    # added by the gate_up expand: more programs in flight at decode sizes, where each shrink
    # block holds one or two rows and its loop over H is all latency).
    lora_block_m: int = 16
    shrink_block_k: int = 128
    shrink_split_k: int = 1
    shrink_num_warps: int = 4
    # LoRA expand of gate_up and down: a loop over the block's slot runs (lora_runs of them
    # stacked per dot, a power of two), or one slot at a time. H100, Qwen3, 8 adapters r16
    # (docs/kernels.md): at T=64 (16-row tiles) the whole layer took 0.488 ms in a graph with
    # the run loop and 2 runs per dot, 0.496 with 1 run, 0.514 with the slot loop; at T=4096
    # (128x128 tiles) the run loop made the down kernel take 592 us against 390 us, so
    # the heuristic keeps the slot loop there.
    run_loop: bool = True
    lora_runs: int = 2
    # down_shrink: 0 = one slot at a time (h re-read per slot), n = n runs stacked per dot,
    # -1 = as many as make 64 columns (4 at rank 16).
    down_shrink_runs: int = -1
    # fuse_shrink: x A^T inside the gate_up K loop that already reads x (no shrink launch, no
    # LoRA alignment; each n-tile program recomputes its rows' shrink, lora_runs runs per pass
    # over K). fuse_down_shrink: h A_down^T in the gate_up epilogue on the h tile in registers,
    # one fp32 partial per n-tile summed by the down expand (no down_shrink launch).
    fuse_shrink: bool = False
    fuse_down_shrink: bool = False
    # The down shrink's I axis split over down_shrink_split_k programs per block (partials
    # summed by the down expand), as shrink_split_k does for H; 1 with fuse_down_shrink.
    down_shrink_split_k: int = 1
    # lora_prefetch: the down expand loads its first shrink and factor tiles before the base
    # K loop (their latency hides behind it; the tiles stay live in registers
    # through the loop). None: for tiles of at most moe_gemm.ops.PREFETCH_MAX_TILE elements.
    lora_prefetch: bool | None = None
    # FP8 experts only: quantize x and h once, in a kernel of their own, before the GEMMs that
    # read them (True), or in every n-tile program's K loop (False; no extra launch, but each
    # program re-reads two bytes per value and re-quantizes them in registers).
    fp8_prequant: bool = True

    def down_tiles(self) -> dict:
        """Tile arguments of the down GEMM launch."""
        return dict(block_n=self.down_block_n, block_k=self.down_block_k or self.block_k,
                    num_warps=self.down_num_warps or self.num_warps,
                    num_stages=self.down_num_stages or self.num_stages, group_m=self.group_m)

    def down_shrink_runs_for(self, max_rank: int) -> int | None:
        """The down shrink's runs per dot (None: its one-slot-at-a-time kernel)."""
        if self.down_shrink_runs >= 0:
            return self.down_shrink_runs or None
        return max(1, 64 // block_r(max_rank))

    def check(self, where: str = "MoEConfig") -> "MoEConfig":
        """``self`` if every value can run; :class:`OptionError` naming the field otherwise."""
        def bad(field, why):
            raise OptionError(f"{where}: {field}={getattr(self, field)!r} {why}")

        for f in ("block_m", "lora_block_m", "block_n", "block_k", "down_block_n",
                  "shrink_block_k"):
            if not _pow2(getattr(self, f)) or getattr(self, f) < 16:
                bad(f, "must be a power of two >= 16 (the smallest tl.dot tile)")
        if self.down_block_k is not None and (not _pow2(self.down_block_k)
                                              or self.down_block_k < 16):
            bad("down_block_k", "must be a power of two >= 16, or null (as block_k)")
        for f in ("num_warps", "shrink_num_warps", "down_num_warps"):
            v = getattr(self, f)
            if not (v is None and f == "down_num_warps") and (not _pow2(v) or v > 16):
                bad(f, "must be 1, 2, 4, 8 or 16")
        for f in ("num_stages", "down_num_stages"):
            v = getattr(self, f)
            if not (v is None and f == "down_num_stages") and (not isinstance(v, int) or v < 1):
                bad(f, "must be an integer >= 1")
        if isinstance(self.group_m, bool) or not isinstance(self.group_m, int) or (
                self.group_m < 1):
            bad("group_m", "must be an integer >= 1 (row blocks per program group)")
        if not _pow2(self.lora_runs):
            bad("lora_runs", "must be a power of two >= 1")
        if self.down_shrink_runs not in (-1, 0) and not _pow2(self.down_shrink_runs):
            bad("down_shrink_runs", "must be -1 (auto), 0 (one slot at a time) or a power of two")
        if not isinstance(self.shrink_split_k, int) or self.shrink_split_k < 1:
            bad("shrink_split_k", "must be an integer >= 1")
        if not isinstance(self.down_shrink_split_k, int) or self.down_shrink_split_k < 1:
            bad("down_shrink_split_k", "must be an integer >= 1")
        if self.fuse_down_shrink and self.down_shrink_split_k != 1:
            bad("down_shrink_split_k", "must be 1 with fuse_down_shrink (its partials are the "
                "gate_up n-tiles)")
        if not (self.lora_prefetch is None or isinstance(self.lora_prefetch, bool)):
            bad("lora_prefetch", "must be true, false or null (by tile size)")
        if self.fuse_shrink and not self.run_loop:
            bad("run_loop", "must be true with fuse_shrink (the fused kernel walks slot runs)")
        if self.fuse_shrink and self.shrink_split_k != 1:
            bad("shrink_split_k", "must be 1 with fuse_shrink (there is no shrink launch)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "MoEConfig":
        """A checked config from a dict (a tuned file's entry); unknown keys are refused."""
        if not isinstance(d, dict):
            raise OptionError(f"{where}: expected an object of MoEConfig fields, got "
                              f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptionError(f"{where}: unknown field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise OptionError(f"{where}: {exc}") from None
        return cfg.check(where)


def lora_block_m_for(num_tokens: int, top_k: int, num_experts: int, num_slots: int) -> int:
    """LoRA shrink blocks by the average rows per (slot, expert). H100, T=4096 (32 rows per
    slot and expert), 32 rows per block took 65 us against 92 us for 16 (A read by fewer
    blocks); 16 and 32 tie at T=64."""
    per_virtual = num_tokens * top_k / max(num_experts, 1) / max(num_slots, 1)
    return 16 if per_virtual < 16 else (32 if per_virtual <= 64 else 64)


# group_m of the heuristic: up to 128 rows per expert the layer is bound by its weight bytes and
# the activations are a few MB (they stay in L2 whatever the order), so a group spans many
# experts' blocks; above, groups of 16 blocks keep a group's activation rows (16 x 128 rows of
# H) in L2 while its columns are swept.
GROUP_M_DECODE, GROUP_M_PREFILL = 64, 16


def heuristic_config(num_tokens: int, top_k: int, num_experts: int,
                     num_slots: int = 1) -> MoEConfig:
    """Tiles by the average rows per expert: small blocks for decode, large for prefill (the
    table fitted by hand on H100 runs; the fallback where no tuned file matches)."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    lora_bm = lora_block_m_for(num_tokens, top_k, num_experts, num_slots)
    if per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4,
                         lora_block_m=lora_bm, down_block_n=64, group_m=GROUP_M_DECODE)
    if per_expert <= 128:
        return MoEConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4,
                         lora_block_m=lora_bm, down_block_n=64, group_m=GROUP_M_DECODE)
    # H100, Qwen3 shapes, T=4096 (256 rows per expert): 128x128 tiles with 8 warps took 0.87
    # ms against 1.04 ms for 64x128 with 4 warps; the LoRA expand loops one slot at a time.
    return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3,
                     lora_block_m=lora_bm, down_block_n=128, run_loop=False,
                     group_m=GROUP_M_PREFILL)


@functools.lru_cache(maxsize=1024)
def pick_config(num_tokens: int, top_k: int, num_experts: int, num_slots: int = 1, *,
                hidden: int | None = None, inter: int | None = None,
                lora_rank: int | None = None, dtype: str | None = None,
                device_name: str | None = None) -> MoEConfig:
    """The config of a call of ``num_tokens`` tokens on ``num_experts`` local experts.

    With ``device_name``, ``hidden``, ``inter`` and ``dtype`` (e.g. ``"NVIDIA H200"``, H,
    I_l, ``"bfloat16"``), a tuned file's entry for ``(H, E_l, K, I_l)`` at the nearest tuned
    token count is used: the ``lora_r<BR>`` entry for a LoRA call (``lora_rank``: the rank tile
    BR; else the smallest tuned rank tile above it, never a smaller one, whose tiles may not
    fit BR's buffers), the ``base`` one otherwise; a LoRA call on a shape tuned for the base
    layer only keeps the tuned base tiles with the heuristic's LoRA switches. Without a match
    (a LoRA call above every tuned rank tile included): :func:`heuristic_config`.

    Cached: every MoE layer of a forward asks with the same sizes, so the choice is made once
    per batch shape, not once per layer."""
    return config_and_source(num_tokens, top_k, num_experts, num_slots, hidden=hidden,
                             inter=inter, lora_rank=lora_rank, dtype=dtype,
                             device_name=device_name)[0]


def config_and_source(num_tokens: int, top_k: int, num_experts: int, num_slots: int = 1, *,
                      hidden=None, inter=None, lora_rank=None, dtype=None,
                      device_name=None) -> tuple[MoEConfig, str]:
    """:func:`pick_config`'s answer and where it comes from: ``"tuned"``, ``"tuned base +
    heuristic LoRA"`` or ``"heuristic"`` (benchmarks report it)."""
    from moelora_dist.kernels.moe_lora import tuned

    fallback = heuristic_config(num_tokens, top_k, num_experts, num_slots)
    if device_name is None or hidden is None or inter is None or dtype is None:
        return fallback, "heuristic"
    key = tuned.ShapeKey(hidden, num_experts, top_k, inter)
    mode = "base" if lora_rank is None else tuned.lora_mode(lora_rank)
    hit = tuned.lookup(device_name, key, dtype, mode, num_tokens)
    if hit is not None:
        return hit, "tuned"
    if lora_rank is None or tuned.has_lora_entries(device_name, key, dtype):
        # a LoRA call whose rank tile is above every tuned one: none of their tiles fit it
        return fallback, "heuristic"
    base = tuned.lookup(device_name, key, dtype, "base", num_tokens)
    if base is None:
        return fallback, "heuristic"
    lora_fields = {f: getattr(fallback, f) for f in LORA_FIELDS}
    return (dataclasses.replace(base, **lora_fields).check("tuned base + heuristic LoRA"),
            "tuned base + heuristic LoRA")


# The fields that only a LoRA call reads.
LORA_FIELDS = ("lora_block_m", "shrink_block_k", "shrink_split_k", "shrink_num_warps",
               "run_loop", "lora_runs", "down_shrink_runs", "fuse_shrink", "fuse_down_shrink",
               "down_shrink_split_k", "lora_prefetch")
