"""Multi-head latent attention (DeepSeek-V3, Kimi-K2) split over TP ranks, with multi-LoRA.

Legend: T tokens, H hidden, N heads on this rank, Cq = q_lora_rank, Ckv = kv_lora_rank,
Dn / Dr = qk_nope / qk_rope head dims, Dv = v_head_dim, Dq = Dn + Dr.

    q   = q_b(RMSNorm_1e-6(q_a(x)))            [T, N, Dq] = [q_nope | q_rope]   (or q_proj(x))
    kva = kv_a_proj_with_mqa(x)                [T, Ckv + Dr] = [latent | k_rope]
    kv  = kv_b(RMSNorm_1e-6(latent))           [T, N, Dn + Dv] = [k_nope | v]
    k   = [k_nope | rope(k_rope)]  (one rope key head shared by every head)
    out = softmax(q k^T * Dq^-0.5 * mscale^2) v,  o_proj(out)  (o input: N * Dv, not head_dim)

TP rule: the heads split (q_b / q_proj and kv_b are column parallel by head, o row parallel);
the latent projections q_a and kv_a_proj_with_mqa (and their norms) are small and replicated,
so every rank computes them whole. Their LoRA is "replicated" in the pool, the others follow
the column / row rule. Both MLA norms use eps 1e-6 whatever ``rms_norm_eps`` says (that is
transformers' ``DeepseekV3RMSNorm`` default, which the attention module does not override).

The paged KV cache holds the expanded per-head keys ``[Dq]`` and values, the values
zero-padded from ``Dv`` to ``Dq`` so that one page shape (and the paged-attention kernels
unchanged) serve MLA: the padded value dims attend to exact zeros and are cut from the output.
Why expanded and not the latent: the kernels, page sizing and CUDA graphs of the other
families then serve MLA as they are, and a kv_b LoRA is applied token by token as the keys
are written (each sequence has one adapter, so this equals PEFT's merged kv_b). Costs:
``N (2 Dq)`` values per token per layer instead of ``N (Dq + Dv)`` (1.2x at DeepSeek-V3's
192 / 128) and far more than the latent's ``Ckv + Dr`` (576); caching the latent would need
absorbed-attention kernels and a per-sequence kv_b LoRA at read time: not done here. The
rope part rotates interleaved pairs in PyTorch before the page write
(:mod:`.paged_rope`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelora_dist.config.model import ModelConfig
from moelora_dist.kernels.paged_attention import naive as pa_naive
from moelora_dist.models.batch import ForwardBatch, PagedKVCache
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.lora_linear import DenseLoRA, base_linear, fuse_rows, linear_with_lora
from moelora_dist.models.ops import rms_norm
from moelora_dist.models.paged_rope import identity_tables, per_token_tables
from moelora_dist.models.rope import apply_rotary

MLA_NORM_EPS = 1e-6


class TPMLA:
    """Weights of one MLA layer on one rank (see the module docstring) and its forward.

    ``w``: ``q_a_proj [Cq, H]``, ``q_a_layernorm [Cq]``, ``q_b_proj [N*Dq, Cq]`` (or
    ``q_proj [N*Dq, H]``), ``kv_a_proj_with_mqa [Ckv+Dr, H]``, ``kv_a_layernorm [Ckv]``,
    ``kv_b_proj [N*(Dn+Dv), Ckv]``, ``o_proj [H, N*Dv]``; biases of q_a, kv_a and o when
    ``attention_bias``. q_a (or q) and kv_a are concatenated at construction into
    ``w["qkv_a_proj"]`` (one GEMM; the two become views of its rows) when
    :func:`.lora_linear.fuse_rows` takes them.
    """

    def __init__(self, cfg: ModelConfig, layer: int, split, weights: dict, tp_group=None,
                 backend: str = "torch"):
        self.cfg, self.layer, self.split, self.tp_group = cfg, layer, split, tp_group
        self.backend = backend
        self.prefix = f"layers.{layer}.self_attn"
        self.mla = cfg.mla
        # q's first projection and kv_a read the same x: one GEMM (lora_linear.fuse_rows)
        w = dict(weights)
        self.q_in = "q_a_proj" if cfg.mla.q_lora_rank is not None else "q_proj"
        parts = (self.q_in, "kv_a_proj_with_mqa")
        self.a_rows = [w[n].shape[0] for n in parts]
        self.fused = fuse_rows(w, parts, "qkv_a_proj")
        self.w = w
        self.scale = self.mla.qk_head_dim ** -0.5 * cfg.rope.softmax_mscale()

    def _kernels(self):
        if self.backend == "triton":
            from moelora_dist.kernels.paged_attention import ops  # Triton: optional off x86

            return ops
        return pa_naive

    def forward(self, x_TH: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache,
                rope: tuple[torch.Tensor, torch.Tensor],
                lora: DenseLoRA | None = None) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]`` summed over TP ranks. ``rope``: the model's ``[Pmax, Dr/2]``
        fp32 tables (YaRN's factor in them); this layer's keys and values go into ``cache``."""
        m, w, p, N = self.mla, self.w, self.prefix, self.split.num_q
        T = x_TH.shape[0]
        q_in = self.q_in
        # both read x: one shrink launch, beside their base GEMM(s)
        pending = (lora.begin(x_TH, [(f"{p}.{q_in}", None), (f"{p}.kv_a_proj_with_mqa", None)])
                   if lora is not None else None)
        if self.fused:
            q0, kva = base_linear(x_TH, w["qkv_a_proj"], w.get("qkv_a_proj.bias")).split(
                self.a_rows, dim=1)
        else:
            q0 = base_linear(x_TH, w[q_in], w.get(f"{q_in}.bias"))
            kva = base_linear(x_TH, w["kv_a_proj_with_mqa"], w.get("kv_a_proj_with_mqa.bias"))
        if pending is not None:
            q0, kva = pending.finish([q0, kva])
        if m.q_lora_rank is not None:
            q0 = linear_with_lora(rms_norm(q0, w["q_a_layernorm"], MLA_NORM_EPS),
                                  w["q_b_proj"], None, lora, f"{p}.q_b_proj")
        q_nope, q_rot = q0.view(T, N, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = kva.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = linear_with_lora(rms_norm(latent, w["kv_a_layernorm"], MLA_NORM_EPS),
                              w["kv_b_proj"], None, lora, f"{p}.kv_b_proj")
        k_nope, v = kv.view(T, N, m.qk_nope_head_dim + m.v_head_dim).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        inter = self.cfg.rope.interleave
        cos_TR, sin_TR = per_token_tables(rope, batch.positions_T, q0.dtype)
        k_rot = apply_rotary(k_rot.reshape(T, 1, m.qk_rope_head_dim), cos_TR, sin_TR, inter)
        # the one shared rope key head is rotated once, then broadcast to every head
        q = torch.cat([q_nope, apply_rotary(q_rot, cos_TR, sin_TR, inter)], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(T, N, m.qk_rope_head_dim)], dim=-1)
        v = F.pad(v, (0, m.qk_head_dim - m.v_head_dim))  # one page shape for keys and values
        kern = self._kernels()
        k_pages, v_pages = cache.k[self.layer], cache.v[self.layer]
        # rope is done: the page write only stores (its rotation is the identity)
        q = kern.rope_write(q.contiguous(), k.contiguous(), v.contiguous(),
                            torch.zeros_like(batch.positions_T),
                            *identity_tables(q.shape[-1] // 2, q.device),
                            batch.slot_mapping_T, k_pages, v_pages)
        out_TNE = kern.paged_attention(q, k_pages, v_pages, batch.block_tables_BM,
                                       batch.kv_lens_B, batch.seg_indptr_B1, scale=self.scale,
                                       decode_only=batch.decode_only)[..., :m.v_head_dim]
        # o is row parallel: its bias is added once, after the sum over ranks, not per rank.
        o = linear_with_lora(out_TNE.reshape(T, N * m.v_head_dim), w["o_proj"], None, lora,
                             f"{p}.o_proj")
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(o, group=self.tp_group)
        if "o_proj.bias" in w:
            o = o + w["o_proj.bias"]
        return o


def mla_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full shapes of one MLA layer's tensors (``{name: shape}``, names as in TPMLA.w)."""
    m, H, N = cfg.mla, cfg.hidden_size, cfg.num_heads
    out = {"kv_a_proj_with_mqa": (m.kv_lora_rank + m.qk_rope_head_dim, H),
           "kv_a_layernorm": (m.kv_lora_rank,),
           "kv_b_proj": (N * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
           "o_proj": (H, N * m.v_head_dim)}
    if m.q_lora_rank is None:
        out["q_proj"] = (N * m.qk_head_dim, H)
    else:
        out.update(q_a_proj=(m.q_lora_rank, H), q_a_layernorm=(m.q_lora_rank,),
                   q_b_proj=(N * m.qk_head_dim, m.q_lora_rank))
    if cfg.attention_bias:
        out.update({"kv_a_proj_with_mqa.bias": (m.kv_lora_rank + m.qk_rope_head_dim,),
                    "o_proj.bias": (H,)})
        if m.q_lora_rank is not None:
            out["q_a_proj.bias"] = (m.q_lora_rank,)
    return out


def mla_rank_slices(cfg: ModelConfig, split) -> dict[str, tuple[int, int, int]]:
    """``{name: (dim, start, end)}`` of the tensors a rank cuts by head; others are whole."""
    m, s0, n = cfg.mla, split.q_start, split.num_q
    kvb = m.qk_nope_head_dim + m.v_head_dim
    return {"q_proj": (0, s0 * m.qk_head_dim, (s0 + n) * m.qk_head_dim),
            "q_b_proj": (0, s0 * m.qk_head_dim, (s0 + n) * m.qk_head_dim),
            "kv_b_proj": (0, s0 * kvb, (s0 + n) * kvb),
            "o_proj": (1, s0 * m.v_head_dim, (s0 + n) * m.v_head_dim)}


def load_mla_weights(reader, cfg: ModelConfig, layer: int, split,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only this rank's heads of one MLA layer (latent projections whole). The linears
    are tensors, or block-FP8 weights for an FP8 checkpoint (:mod:`.fp8_weights`)."""
    p = f"model.layers.{layer}.self_attn"
    cuts = mla_rank_slices(cfg, split)
    w = {}
    for name, shape in mla_shapes(cfg).items():
        if name.endswith((".bias", "layernorm")):
            key = f"{p}.{name}" if name.endswith(".bias") else f"{p}.{name}.weight"
            w[name] = reader.get(key, dtype=dtype, expect_shape=shape)
            continue
        kw = {}
        if name in cuts:
            dim, lo, hi = cuts[name]
            kw = {"rows" if dim == 0 else "cols": (lo, hi)}
        w[name] = read_linear(reader, cfg, f"{p}.{name}", dtype=dtype, expect_shape=shape, **kw)
    return w
