"""Self-attention split over tensor-parallel ranks by heads, with multi-LoRA on q/k/v/o.

Legend: T tokens, H hidden, N_q / N_kv query / kv heads on this rank, D head dim, B requests,
Q padded new tokens per request, L keys per request, R rotated dims.

Grouped-query attention of every GQA family: q/k/v biases (``attention_bias``), an o bias
(gpt-oss; never GLM-4.5), q/k RMSNorm per head (Qwen3, GLM ``use_qk_norm``) or over the whole
projection (OLMoE), partial rotary (the tables are ``[T, R]``, ``R <= D``: GLM's first half),
a sliding window per layer and attention sinks (gpt-oss; each rank holds its heads' sinks).
The core (scatter to requests, SDPA, sinks) is :mod:`.attention_core`; MLA is :mod:`.mla`.

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
import torch.nn.functional as F  # noqa: F401  (tests spy on F.scaled_dot_product_attention)

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.models.attention_core import SDPA_BACKENDS, attend  # noqa: F401
from moelora_dist.models.batch import ForwardBatch, KVCache
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.lora_linear import DenseLoRA, linear_with_lora
from moelora_dist.models.ops import rms_norm, rms_norm_sharded
from moelora_dist.models.rope import apply_rotary


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
        if cfg.attention == "mla":  # keys and values are expanded per query head
            return cls(tp_rank * num_q, num_q, tp_rank * num_q, num_q, 1)
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
        # A per-layer window (gpt-oss); a model-wide one (Mixtral) is in the batch mask already.
        self.window = cfg.layer_windows[layer] if cfg.layer_windows else None
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
        token of the batch uses an adapter. ``cos_TD``/``sin_TD``: ``[T, R]`` RoPE tables
        (``R < D``: partial rotary on the first ``R`` dims of each head).
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
        q = apply_rotary(q, cos_TD, sin_TD)
        k = apply_rotary(k, cos_TD, sin_TD)
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
        """``[T, N_q, D]`` attention of this layer (its window, its heads' sinks)."""
        return attend(q_TND, k_BNLD, v_BNLD, batch, scale=self.cfg.head_dim ** -0.5,
                      window=self.window, sinks_N=self.w.get("sinks"))


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
        # o_bias None: the classic families have one when the checkpoint does
        if cfg.o_bias or (cfg.o_bias is None and reader.has(f"{p}.o_proj.bias")):
            w["o_proj.bias"] = reader.get(f"{p}.o_proj.bias", dtype=dtype, expect_shape=(H,))
    if cfg.sinks:  # one logit per query head: each rank keeps its heads'
        w["sinks"] = reader.rows(f"{p}.sinks", split.q_start, split.q_start + split.num_q,
                                 dtype=dtype, expect_shape=(cfg.num_heads,))
    if cfg.qk_norm == "head":
        w["q_norm"] = reader.get(f"{p}.q_norm.weight", dtype=dtype, expect_shape=(D,))
        w["k_norm"] = reader.get(f"{p}.k_norm.weight", dtype=dtype, expect_shape=(D,))
    elif cfg.qk_norm == "full":
        w["q_norm"] = reader.rows(f"{p}.q_norm.weight", *q_rows, dtype=dtype,
                                  expect_shape=(cfg.num_heads * D,))
        w["k_norm"] = reader.rows(f"{p}.k_norm.weight", *kv_rows, dtype=dtype,
                                  expect_shape=(cfg.num_kv_heads * D,))
    return w
