"""Self-attention split over tensor-parallel ranks by heads, with multi-LoRA on q/k/v/o.

Legend: T tokens, H hidden, N_q / N_kv query / kv heads on this rank, D head dim, R rotated
dims of a head.

Grouped-query attention of every GQA family: q/k/v biases (``attention_bias``), an o bias
(gpt-oss; never GLM-4.5), q/k RMSNorm per head (Qwen3, GLM ``use_qk_norm``) or over the whole
projection (OLMoE), a sliding window per layer and attention sinks (gpt-oss; each rank holds
its heads' sinks), YaRN through the model's rotary tables. Full rotate-half rotary is fused
into the page write; a partial one (GLM-4.5: the first ``R = D * partial_rotary_factor``
dims) is applied in PyTorch first (:func:`.paged_rope.rotate_then_write`). MLA is :mod:`.mla`.

Split (Megatron style): q/k/v are column parallel (each rank computes its heads), o is row
parallel (each rank holds the matching input columns) and its partial output is summed with one
all-reduce over the TP group. With fewer kv heads than TP ranks each kv head is replicated on
``tp / num_kv_heads`` consecutive ranks, which is exactly the set of ranks whose query heads use
it. LoRA deltas follow the same split (see :mod:`.lora_linear`).

A forward is four GEMM-sized steps: one q/k/v GEMM (weights concatenated at load; their LoRA
shares one shrink), the write of the new keys and values into their pages with the per-head
q/k norm and the rotary embedding fused in (``rope_write`` of the paged-attention kernel
family), paged attention over each sequence's pages (decode and prefill chunks alike), and o.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.kernels.paged_attention import naive as pa_naive
from moelora_dist.models.batch import ForwardBatch, PagedKVCache
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.lora_linear import (DeferredLoRA, DenseLoRA, base_linear, fuse_rows,
                                             linear_with_lora)
from moelora_dist.models.ops import rms_norm, rms_norm_sharded
from moelora_dist.models.paged_rope import rotate_then_write
from moelora_dist.parallel.groups import group_size


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

    ``w_qkv [(N_q + 2 N_kv) * D, H]``: q, k and v rows of this rank concatenated at load so
    that one GEMM computes all three (``w["q_proj"]``, ``w["k_proj"]``, ``w["v_proj"]`` are
    views of it; block-FP8 projections too, their scale rows with them, see
    :func:`.lora_linear.fuse_rows`); ``w_o [H, N_q*D]``
    (rank-local), optional biases, q/k norm weights (``[D]`` per head for Qwen3, this rank's
    slice of the whole projection for OLMoE).
    ``backend``: ``"torch"`` (the references) or ``"triton"`` for the paged-attention kernels.
    """

    def __init__(self, cfg: ModelConfig, layer: int, split: HeadSplit, weights: dict,
                 tp_group=None, backend: str = "torch"):
        self.cfg, self.layer, self.split, self.tp_group = cfg, layer, split, tp_group
        self.backend = backend
        self.prefix = f"layers.{layer}.self_attn"
        self.window = cfg.window_of(layer)  # per layer (gpt-oss) or model-wide (Mixtral)
        self.partial = cfg.rope.rotary_dim < cfg.head_dim  # GLM-4.5: rotary in PyTorch
        D = cfg.head_dim
        self.sizes = [split.num_q * D, split.num_kv * D, split.num_kv * D]
        w = dict(weights)
        names = ("q_proj", "k_proj", "v_proj")
        # One GEMM for the three when they are of one kind (all in the model dtype, or all
        # block-FP8: their scale rows are concatenated too); a mix stays three.
        self.fused = fuse_rows(w, names, "qkv_proj")
        self.w = w
        # Rows of the pool's replicated k/v LoRA B that belong to this rank's kv head.
        self.kv_rows = None if split.kv_sharded else slice(
            split.kv_start * D, (split.kv_start + split.num_kv) * D)

    def _kernels(self):
        if self.backend == "triton":
            from moelora_dist.kernels.paged_attention import ops  # Triton: optional off x86

            return ops
        return pa_naive

    def forward(self, x_TH: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache,
                rope: tuple[torch.Tensor, torch.Tensor],
                lora: DenseLoRA | None = None) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]`` (full sum over TP ranks on every rank); with
        :data:`.lora_linear.FUSE_EXPAND` on one GPU a :class:`.lora_linear.DeferredLoRA` (o's
        base output and its pending delta, for the residual add + norm to fuse).

        ``rope``: the model's ``cos, sin`` tables ``[max_positions, D/2]`` fp32. ``lora``: this
        forward's dense LoRA (:class:`.lora_linear.DenseLoRA`), or None when no token of the
        batch uses an adapter. This layer's new keys and values are written into ``cache``.
        """
        cfg, sp, D = self.cfg, self.split, self.cfg.head_dim
        T = x_TH.shape[0]
        pending = None
        if lora is not None:  # one shrink launch for q, k and v (they read the same x),
            p = self.prefix   # on a side stream beside the base GEMM
            pending = lora.begin(x_TH, [(f"{p}.q_proj", None), (f"{p}.k_proj", self.kv_rows),
                                        (f"{p}.v_proj", self.kv_rows)])
        if self.fused:
            qkv = base_linear(x_TH, self.w["qkv_proj"], self.w.get("qkv_proj.bias"))
            q, k, v = qkv.split(self.sizes, dim=1)
        else:
            q, k, v = (base_linear(x_TH, self.w[n], self.w.get(f"{n}.bias"))
                       for n in ("q_proj", "k_proj", "v_proj"))
        # q/k/v's expand inside the page write (FUSE_EXPAND) where nothing runs between them
        fuse = (pending is not None and lora.fuses_expand and not self.partial
                and cfg.qk_norm != "full" and cfg.clip_qkv is None)
        if pending is not None and not fuse:
            q, k, v = pending.finish([q, k, v])
        if cfg.qk_norm == "full":
            q = rms_norm_sharded(q, self.w["q_norm"], cfg.rms_norm_eps, cfg.num_heads * D,
                                 self.tp_group)
            k = rms_norm_sharded(k, self.w["k_norm"], cfg.rms_norm_eps, cfg.num_kv_heads * D,
                                 self.tp_group, sp.kv_replication)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        head = cfg.qk_norm == "head"
        kern = self._kernels()
        k_pages, v_pages = cache.k[self.layer], cache.v[self.layer]
        q3, k3, v3 = q.view(T, sp.num_q, D), k.view(T, sp.num_kv, D), v.view(T, sp.num_kv, D)
        if self.partial:  # GLM-4.5: per-head norm and partial rotary here, then the write
            if head:
                q3 = rms_norm(q3, self.w["q_norm"], cfg.rms_norm_eps)
                k3 = rms_norm(k3, self.w["k_norm"], cfg.rms_norm_eps)
            q_TND = rotate_then_write(kern, q3, k3, v3, batch, rope, k_pages, v_pages)
        else:
            q_TND = kern.rope_write(q3, k3, v3, batch.positions_T, rope[0], rope[1],
                                    batch.slot_mapping_T, k_pages, v_pages,
                                    self.w["q_norm"] if head else None,
                                    self.w["k_norm"] if head else None, cfg.rms_norm_eps,
                                    **(dict(lora=pending.token_lora()) if fuse else {}))
        out_TND = kern.paged_attention(q_TND, k_pages, v_pages, batch.block_tables_BM,
                                       batch.kv_lens_B, batch.seg_indptr_B1, scale=D ** -0.5,
                                       sliding_window=self.window,
                                       decode_only=batch.decode_only,
                                       sinks_N=self.w.get("sinks"))
        # o is row parallel: its bias is added once, after the sum over ranks, not per rank.
        o_in = out_TND.reshape(T, sp.num_q * D)
        single = group_size(self.tp_group) == 1
        if (lora is not None and lora.fuses_expand and single
                and "o_proj.bias" not in self.w):  # the next residual add + norm adds it
            pending_o = lora.begin(o_in, [(f"{self.prefix}.o_proj", None)])
            return DeferredLoRA(base_linear(o_in, self.w["o_proj"]), pending_o)
        o = linear_with_lora(o_in, self.w["o_proj"], None, lora, f"{self.prefix}.o_proj")
        if not single:
            dist.all_reduce(o, group=self.tp_group)
        if "o_proj.bias" in self.w:
            o = o + self.w["o_proj.bias"]
        return o


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
