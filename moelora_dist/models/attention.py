"""Self-attention split over tensor-parallel ranks by heads, with multi-LoRA on q/k/v/o.

Legend: T tokens, H hidden, N_q / N_kv query / kv heads on this rank, D head dim, B requests,
Q padded new tokens per request, L keys per request.

Split (Megatron style): q/k/v are column parallel (each rank computes its heads), o is row
parallel (each rank holds the matching input columns) and its partial output is summed with one
all-reduce over the TP group. With fewer kv heads than TP ranks each kv head is replicated on
``tp / num_kv_heads`` consecutive ranks, which is exactly the set of ranks whose query heads use
it. LoRA deltas follow the same split (see :mod:`.lora_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moelora_dist.models.batch import ForwardBatch, KVCache
from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.lora_linear import DenseLoRA, linear_with_lora
from moelora_dist.models.ops import apply_rope, rms_norm, rms_norm_sharded


# cuDNN attention compiles an execution plan per shape, and decode grows the kv length every
# step: on an H100 (torch 2.11) the first decode step at each new length took 70-110 ms for four
# layers against 12 ms with the memory-efficient kernel. Every other backend takes any shape.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class HeadSplit:
    """Which heads one TP rank computes. ``kv_replication`` ranks share each kv head."""

    q_start: int
    num_q: int
    kv_start: int
    num_kv: int
    kv_replication: int

    @classmethod
    def for_rank(cls, cfg: ModelConfig, tp: int, tp_rank: int) -> "HeadSplit":
        if cfg.num_heads % tp:
            raise ModelConfigError(
                f"num_attention_heads={cfg.num_heads} is not divisible by tp={tp}; pick tp from "
                f"{[d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0]}")
        num_q = cfg.num_heads // tp
        if cfg.num_kv_heads >= tp:
            if cfg.num_kv_heads % tp:
                raise ModelConfigError(
                    f"num_key_value_heads={cfg.num_kv_heads} is not divisible by tp={tp}")
            num_kv = cfg.num_kv_heads // tp
            return cls(tp_rank * num_q, num_q, tp_rank * num_kv, num_kv, 1)
        if tp % cfg.num_kv_heads:
            raise ModelConfigError(
                f"tp={tp} is not a multiple of num_key_value_heads={cfg.num_kv_heads}; kv heads "
                "can be replicated over TP ranks only when tp is a multiple of their number")
        rep = tp // cfg.num_kv_heads
        return cls(tp_rank * num_q, num_q, tp_rank // rep, 1, rep)

    @property
    def kv_sharded(self) -> bool:
        """True when the k/v projections split by the ordinary column rule."""
        return self.kv_replication == 1


class TPAttention:
    """Weights of one attention layer on one rank, and its forward.

    ``w_q [N_q*D, H]``, ``w_k``/``w_v [N_kv*D, H]``, ``w_o [H, N_q*D]`` (rank-local), optional
    biases, q/k norm weights (``[D]`` per head for Qwen3, this rank's slice of the whole
    projection for OLMoE).
    """

    def __init__(self, cfg: ModelConfig, layer: int, split: HeadSplit, weights: dict,
                 tp_group=None):
        self.cfg, self.layer, self.split, self.tp_group = cfg, layer, split, tp_group
        self.w = weights
        self.prefix = f"layers.{layer}.self_attn"
        D = cfg.head_dim
        # Rows of the pool's replicated k/v LoRA B that belong to this rank's kv head.
        self.kv_rows = None if split.kv_sharded else slice(
            split.kv_start * D, (split.kv_start + split.num_kv) * D)

    def _proj(self, name: str, x_TH, lora, out_rows=None, bias=True):
        b = self.w.get(f"{name}.bias") if bias else None
        return linear_with_lora(x_TH, self.w[name], b, lora, f"{self.prefix}.{name}", out_rows)

    def forward(self, x_TH: torch.Tensor, batch: ForwardBatch, cache: KVCache,
                cos_TD: torch.Tensor, sin_TD: torch.Tensor,
                lora: DenseLoRA | None = None) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]`` (full sum over TP ranks on every rank).

        ``lora``: this forward's dense LoRA (:class:`.lora_linear.DenseLoRA`), or None when no
        token of the batch uses an adapter. ``cos_TD``/``sin_TD``: ``[T, D]`` RoPE tables.
        """
        cfg, sp, D = self.cfg, self.split, self.cfg.head_dim
        T = x_TH.shape[0]
        q, k, v = (self._proj(n, x_TH, None) for n in ("q_proj", "k_proj", "v_proj"))
        if lora is not None:  # one shrink GEMM for q, k and v: they read the same x
            p = self.prefix
            q, k, v = lora.apply_group(x_TH, [(q, f"{p}.q_proj", None),
                                              (k, f"{p}.k_proj", self.kv_rows),
                                              (v, f"{p}.v_proj", self.kv_rows)])
        if cfg.qk_norm == "full":
            q = rms_norm_sharded(q, self.w["q_norm"], cfg.rms_norm_eps, cfg.num_heads * D,
                                 self.tp_group)
            k = rms_norm_sharded(k, self.w["k_norm"], cfg.rms_norm_eps, cfg.num_kv_heads * D,
                                 self.tp_group, sp.kv_replication)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, sp.num_q, D)
        k = k.view(T, sp.num_kv, D)
        v = v.view(T, sp.num_kv, D)
        if cfg.qk_norm == "head":
            q = rms_norm(q, self.w["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, self.w["k_norm"], cfg.rms_norm_eps)
        q = apply_rope(q, cos_TD, sin_TD)
        k = apply_rope(k, cos_TD, sin_TD)
        k_BNLD, v_BNLD = cache.write_and_read(self.layer, batch, k, v)
        out_TND = self._attend(q, k_BNLD, v_BNLD, batch)
        # o is row parallel: its bias is added once, after the sum over ranks, not per rank.
        o = self._proj("o_proj", out_TND.reshape(T, sp.num_q * D), lora, bias=False)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(o, group=self.tp_group)
        if "o_proj.bias" in self.w:
            o = o + self.w["o_proj.bias"]
        return o

    def _attend(self, q_TND, k_BNLD, v_BNLD, batch: ForwardBatch) -> torch.Tensor:
        """Scatter queries to ``[B, Q]``, attend, gather back to ``[T, N_q, D]``.

        Grouped-query attention without copying kv heads: the ``g`` query heads that share a kv
        head are stacked along the query axis (``[B, N_kv, g*Q, D]``), so the kv tensors are
        read as they are and the mask is tiled ``g`` times.
        """
        sp, D = self.split, self.cfg.head_dim
        B, Q = batch.num_requests, batch.max_q
        g = sp.num_q // sp.num_kv
        if Q == 1:  # decode: one token per request, already in [B, Q] order; no scatter
            q_BQND = q_TND[:, None]
        else:
            q_BQND = q_TND.new_zeros(B, Q, sp.num_q, D)
            q_BQND[batch.req_T, batch.j_T] = q_TND
        q_grp = q_BQND.view(B, Q, sp.num_kv, g, D).permute(0, 2, 3, 1, 4).reshape(
            B, sp.num_kv, g * Q, D)
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(q_grp, k_BNLD, v_BNLD,
                                                 attn_mask=batch.grouped_mask(g), scale=D ** -0.5)
        out_BQND = out.view(B, sp.num_kv, g, Q, D).permute(0, 3, 1, 2, 4).reshape(
            B, Q, sp.num_q, D)
        return out_BQND[:, 0] if Q == 1 else out_BQND[batch.req_T, batch.j_T]


def load_attention_weights(reader, cfg: ModelConfig, layer: int, split: HeadSplit,
                           dtype: torch.dtype) -> dict:
    """Read only this rank's rows/columns of one attention layer (see :class:`TPAttention`)."""
    D, H = cfg.head_dim, cfg.hidden_size
    p = f"model.layers.{layer}.self_attn"
    q_rows = (split.q_start * D, (split.q_start + split.num_q) * D)
    kv_rows = (split.kv_start * D, (split.kv_start + split.num_kv) * D)
    proj = lambda name, **kw: read_linear(reader, cfg, f"{p}.{name}", dtype=dtype, **kw)  # noqa: E731
    w = {  # a tensor, or a BlockFP8Weight for an FP8 checkpoint's projections
        "q_proj": proj("q_proj", rows=q_rows, expect_shape=(cfg.num_heads * D, H)),
        "k_proj": proj("k_proj", rows=kv_rows, expect_shape=(cfg.num_kv_heads * D, H)),
        "v_proj": proj("v_proj", rows=kv_rows, expect_shape=(cfg.num_kv_heads * D, H)),
        "o_proj": proj("o_proj", cols=q_rows, expect_shape=(H, cfg.num_heads * D)),
    }
    if cfg.attention_bias:
        w["q_proj.bias"] = reader.rows(f"{p}.q_proj.bias", *q_rows, dtype=dtype)
        w["k_proj.bias"] = reader.rows(f"{p}.k_proj.bias", *kv_rows, dtype=dtype)
        w["v_proj.bias"] = reader.rows(f"{p}.v_proj.bias", *kv_rows, dtype=dtype)
        if reader.has(f"{p}.o_proj.bias"):
            w["o_proj.bias"] = reader.get(f"{p}.o_proj.bias", dtype=dtype)
    if cfg.qk_norm == "head":
        w["q_norm"] = reader.get(f"{p}.q_norm.weight", dtype=dtype, expect_shape=(D,))
        w["k_norm"] = reader.get(f"{p}.k_norm.weight", dtype=dtype, expect_shape=(D,))
    elif cfg.qk_norm == "full":
        w["q_norm"] = reader.rows(f"{p}.q_norm.weight", *q_rows, dtype=dtype,
                                  expect_shape=(cfg.num_heads * D,))
        w["k_norm"] = reader.rows(f"{p}.k_norm.weight", *kv_rows, dtype=dtype,
                                  expect_shape=(cfg.num_kv_heads * D,))
    return w
