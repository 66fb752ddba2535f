"""What the tuner tunes: model shapes, one problem per (shape, token count, base or LoRA), the
inputs of a problem and the reference rows every candidate is checked against.

Legend: T tokens, H hidden, E experts (E_l local), K top-k, I intermediate (I_l local), S slots.

A problem's inputs are those of a serving batch: random bf16 weights scaled like trained ones,
softmax routing over all E experts localized to EP rank 0 (the other ranks' experts are the
sentinel -1, as the all-reduce dispatcher hands them), and for LoRA ``adapters`` adapters of one
rank in a pool of 8 slots, each on a contiguous run of the tokens (the issue's benchmark case).

FP8 problems (``Problem.fp8``) take the same random weights block-quantized the way FP8
checkpoints are (e4m3 values, one fp32 scale per 128x128 block:
:func:`~moelora_dist.kernels.block_fp8.naive.quantize_weight`); their entries go under the
dtype key ``"<dtype>+fp8"`` (:attr:`Problem.dtype_key`), the key the layer asks with for FP8
experts (``kernels/moe_lora/ops.py::_pick_args``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moelora_dist.errors import OptionError
from moelora_dist.kernels.block_fp8.naive import quantize_weight
from moelora_dist.kernels.constants import FP8_GROUP, block_r
from moelora_dist.kernels.moe_lora.naive import experts_reference
from moelora_dist.kernels.moe_lora.tuned import FP8_SUFFIX, ShapeKey, dtype_key, lora_mode
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.moe.router import localize_topk_ids, route
from moelora_dist.testing.kernel_cases import make_lora

NUM_SLOTS = 8
SAMPLE_TOKENS = 64  # reference rows per check (every token when T is smaller)
DTYPES = ("bfloat16", "float16")


def parse_dtype_key(key: str) -> tuple[str, bool]:
    """``(dtype, fp8)`` of a dtype key (``"bfloat16+fp8"`` -> ``("bfloat16", True)``);
    ValueError for a key the tuner does not write."""
    dtype, fp8 = (key[:-len(FP8_SUFFIX)], True) if key.endswith(FP8_SUFFIX) else (key, False)
    if dtype not in DTYPES:
        raise ValueError(f"dtype key {key!r}: expected one of {', '.join(DTYPES)}, "
                         f"optionally with {FP8_SUFFIX!r}")
    return dtype, fp8


@dataclass(frozen=True)
class ShapeSpec:
    """One MoE layer's sizes as one rank sees them (EP ``ep``, MoE-TP ``moe_tp``)."""

    name: str
    hidden: int
    num_experts: int
    top_k: int
    inter: int
    ep: int = 1
    moe_tp: int = 1

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep

    @property
    def local_inter(self) -> int:
        return self.inter // self.moe_tp

    @property
    def key(self) -> ShapeKey:
        return ShapeKey(self.hidden, self.local_experts, self.top_k, self.local_inter)


PRESETS = {s.name: s for s in (
    ShapeSpec("qwen3-30b-a3b", 2048, 128, 8, 768),
    ShapeSpec("mixtral-8x7b", 4096, 8, 2, 14336),
    ShapeSpec("olmoe", 2048, 64, 8, 1024),
    # DeepSeek-V3 / Kimi-K2 routed experts at EP 8: 32 local experts, about one of a token's 8
    # experts on this rank.
    ShapeSpec("deepseek-v3-routed", 7168, 256, 8, 2048, ep=8),
)}


def parse_shape(text: str) -> ShapeSpec:
    """A preset name or ``H,E,K,I[,EP[,MOE_TP]]`` (E and I before the split)."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(",")
    if not 4 <= len(parts) <= 6 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise OptionError(f"--shape {text!r}: give one of {', '.join(PRESETS)} or "
                          "H,E,K,I[,EP[,MOE_TP]] (positive integers)")
    H, E, K, I, *rest = (int(p) for p in parts)
    ep, moe_tp = (rest + [1, 1])[:2]
    if E % ep or I % moe_tp:
        raise OptionError(f"--shape {text!r}: EP {ep} must divide E {E} and MoE-TP {moe_tp} "
                          f"must divide I {I}")
    if K > E:
        raise OptionError(f"--shape {text!r}: top-k {K} exceeds the {E} experts")
    return ShapeSpec(text, H, E, K, I, ep, moe_tp)


@dataclass(frozen=True)
class Problem:
    """One entry of the tuned file: a shape at ``tokens`` tokens, base (``rank`` None) or with
    ``adapters`` adapters of ``rank`` on every token; activations in ``dtype``, expert weights
    in ``dtype`` too or, with ``fp8``, block-FP8."""

    shape: ShapeSpec
    tokens: int
    rank: int | None = None
    adapters: int = NUM_SLOTS
    dtype: str = "bfloat16"
    fp8: bool = False

    @property
    def mode(self) -> str:
        return "base" if self.rank is None else lora_mode(block_r(self.rank))

    @property
    def dtype_key(self) -> str:
        return dtype_key(self.dtype, self.fp8)

    @property
    def name(self) -> str:
        return f"{self.shape.name} T={self.tokens} {self.mode}" + (" fp8" if self.fp8 else "")


def entry_problem(shape: ShapeKey, key: str, mode: str, tokens: int) -> Problem:
    """The problem a tuned file's entry was tuned on (its inputs as the tuner built them, FP8
    experts for a ``+fp8`` key; the adapters at the entry's rank tile): for the tests that
    re-check every entry (``key``: the dtype key). ValueError for a key or mode the tuner does
    not write."""
    dtype, fp8 = parse_dtype_key(key)
    if mode == "base":
        rank = None
    elif mode.startswith("lora_r") and mode[6:].isdigit():
        rank = int(mode[6:])
    else:
        raise ValueError(f"mode {mode!r}: expected base or lora_r<BR>")
    spec = ShapeSpec(str(shape), shape.hidden, shape.num_experts, shape.top_k, shape.inter)
    return Problem(spec, tokens, rank, dtype=dtype, fp8=fp8)


_WEIGHTS: dict = {}


def _empty_fp8(size_ENK: tuple[int, int, int], device) -> BlockFP8Weight:
    """An uninitialized block-FP8 weight of logical size ``[E, N, K]``: e4m3 values and fp32
    scales ``[E, ceil(N / 128), ceil(K / 128)]``, what a checkpoint's weight gives."""
    E, N, K = size_ENK
    return BlockFP8Weight(
        torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=device),
        torch.empty(E, -(-N // FP8_GROUP), -(-K // FP8_GROUP), dtype=torch.float32,
                    device=device), FP8_GROUP)


def _weights(shape: ShapeSpec, dtype, device, fill: str, fp8: bool = False):
    """``(w_gate_up [E_l, 2 I_l, H], w_down [E_l, H, I_l])`` in ``dtype``, or block-FP8
    (:class:`BlockFP8Weight`) with ``fp8``."""
    key = (shape.key, dtype, str(device), fill, fp8)
    if key not in _WEIGHTS:  # one copy per shape: problems of one shape share it
        _WEIGHTS.clear()
        E, H, I = shape.local_experts, shape.hidden, shape.local_inter
        sizes = ((E, 2 * I, H), (E, H, I))
        if fill == "empty" and fp8:  # compile-only runs: addresses and shapes matter
            _WEIGHTS[key] = tuple(_empty_fp8(s, device) for s in sizes)
        elif fill == "empty":
            _WEIGHTS[key] = tuple(torch.empty(*s, dtype=dtype, device=device) for s in sizes)
        else:
            g = torch.Generator(device=device).manual_seed(1)
            ws = []
            for s, fan in zip(sizes, (H, I)):
                w = (torch.randn(*s, generator=g, device=device) * fan ** -0.5).to(dtype)
                # FP8: the bf16 problem's weights quantized, so the two tune the same layer.
                ws.append(quantize_weight(w) if fp8 else w)
                del w  # FP8: the bf16 copy (1.9 GB at DeepSeek-V3's size) freed before the next
            _WEIGHTS[key] = tuple(ws)
    return _WEIGHTS[key]


def make_inputs(problem: Problem, device, *, fill: str = "random", seed: int = 0) -> dict:
    """Keyword arguments of ``fused_moe_lora`` for ``problem`` (plus ``num_lora_tokens``).

    ``fill="empty"``: weights left uninitialized (the compile workers only need the shapes).
    With ``problem.fp8`` both weights are :class:`BlockFP8Weight`; the rest is the same."""
    s, T = problem.shape, problem.tokens
    dtype = getattr(torch, problem.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    w_gu, w_d = _weights(s, dtype, device, fill, problem.fp8)
    x = torch.randn(T, s.hidden, generator=g, device=device).to(dtype)
    tw, ids = route(torch.randn(T, s.num_experts, generator=g, device=device), s.top_k,
                    renormalize=True)
    ids = localize_topk_ids(ids, 0, s.local_experts)
    inp = dict(x_TH=x, w_gate_up_EXH=w_gu, w_down_EHI=w_d, topk_weights_TK=tw,
               topk_ids_TK=ids, token_slot_T=None, lora=None, slot_enabled_S=None)
    if problem.rank is None:
        return inp
    n = problem.adapters
    ranks = [problem.rank] * n + [0] * (NUM_SLOTS - n)
    lora = make_lora(NUM_SLOTS, s.local_experts, problem.rank, s.hidden, s.local_inter, dtype,
                     device, g, ranks=ranks)
    per = math.ceil(T / n)
    slot = (torch.arange(T, device=device) // per).to(torch.int32)
    enabled = torch.zeros(NUM_SLOTS, dtype=torch.bool, device=device)
    enabled[slot.unique().long()] = True
    inp.update(token_slot_T=slot, lora=lora, slot_enabled_S=enabled, num_lora_tokens=T)
    return inp


def rows_per_expert(inp: dict) -> float:
    """Valid (token, k) pairs per local expert: what the block sizes should follow."""
    ids = inp["topk_ids_TK"]
    return float((ids >= 0).sum()) / inp["w_gate_up_EXH"].shape[0]


@dataclass
class Reference:
    """``experts_reference`` on a sample of the tokens: a token's output depends on its own
    row only (the reference computes row by row), so these rows are exact for any batch."""

    rows: torch.Tensor  # [n] token indices
    want: torch.Tensor  # [n, H] in x's dtype
    scale: float  # max(1, max |want|): the tolerance's unit

    def error(self, y_TH: torch.Tensor) -> float:
        """Largest difference on the sampled rows, in units of ``scale`` (NaN -> inf)."""
        got = y_TH[self.rows].float()
        if not torch.isfinite(got).all():
            return math.inf
        return float((got - self.want.float()).abs().max()) / self.scale if got.numel() else 0.0


def reference_rows(inp: dict, *, sample: int = SAMPLE_TOKENS, seed: int = 0) -> Reference:
    T = inp["x_TH"].shape[0]
    g = torch.Generator().manual_seed(seed)
    if T <= sample:
        rows = torch.arange(T)
    else:  # the first and last token (block edges), the rest at random
        rest = torch.randperm(T - 2, generator=g)[:sample - 2] + 1
        rows = torch.cat([torch.tensor([0, T - 1]), rest]).sort().values
    rows = rows.to(inp["x_TH"].device)
    ts = inp["token_slot_T"]
    if ts is not None:  # what the batch info hands the reference: disabled slots -> -1
        ok = (ts >= 0) & inp["slot_enabled_S"][ts.clamp(min=0).long()]
        ts = torch.where(ok, ts, torch.full_like(ts, -1))[rows]
    # an expert variant's activation and biases (gpt-oss), when the inputs have them
    variant = {k: inp[k] for k in ("activation", "b_gate_up_EX", "b_down_EH") if k in inp}
    want = experts_reference(inp["x_TH"][rows], inp["w_gate_up_EXH"], inp["w_down_EHI"],
                             inp["topk_weights_TK"][rows], inp["topk_ids_TK"][rows], ts,
                             inp["lora"], **variant)
    return Reference(rows, want, max(1.0, float(want.float().abs().max())))
