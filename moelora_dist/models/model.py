"""The decoder stack: embeddings, attention + (MoE | dense MLP) layers, final norm, LM head.

Legend: T tokens (packed over requests), H hidden, V vocab, N positions whose logits are wanted.

Family variants are chosen here once, from the config: the attention (GQA :mod:`.attention`
or MLA :mod:`.mla`), the MoE block's router and expert variants (:mod:`moelora_dist.moe`),
shared experts added to the routed output without a gate (DeepSeek-V3, GLM-4.5), and gpt-oss's
RMSNorm (weight times the fp32 normalized value, then cast; its norm weights stay fp32 as
transformers keeps them). A router LoRA (``mlp.gate`` / ``mlp.router``, e.g. what PEFT's
``all-linear`` writes) is added to the router logits before routing, and only computed while
a resident adapter has one (:meth:`LoRAPool.targets`).

One :class:`MoELoRAModel` per rank holds that rank's slices (see :mod:`.weights`) and one
:class:`~moelora_dist.lora.pool.LoRAPool` for all its LoRA buffers: MoE layers read them through
:class:`~moelora_dist.moe.layer.LoRAMoE`, attention and dense MLPs through
:func:`~.lora_linear.linear_with_lora`. Embeddings and the LM head are replicated, so every
rank ends with the same logits (computing them costs one ``[N, H] x [H, V]`` GEMM per rank).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from tqdm import tqdm

from moelora_dist.config.model import ModelConfig
from moelora_dist.kernels.constants import Activation
from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.lora.pool import DenseModuleSpec, LoRAPool, MoELayerSpec, PoolConfig
from moelora_dist.models.attention import HeadSplit, TPAttention
from moelora_dist.kernels.norm import naive as norm_naive
from moelora_dist.models.batch import ForwardBatch, PagedKVCache
from moelora_dist.models.fp8_layout import check_fp8_layout
from moelora_dist.kernels.moe_gemm.pairs import PairOutputs
from moelora_dist.models.lora_linear import DeferredLoRA, DenseLoRA, base_linear
from moelora_dist.models.memory import describe_memory, place_weight
from moelora_dist.models.mla import TPMLA
from moelora_dist.models.mlp import DenseMLP
from moelora_dist.models.mxfp4 import mxfp4_note
from moelora_dist.models.ops import rms_norm
from moelora_dist.models.rope import rope_tables_for
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.experts import pick_backend
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.moe.router import RouterSpec
from moelora_dist.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)
DEFAULT_MAX_POSITIONS = 8192  # rotary table length when config.json does not say
# On CUDA, one GPU: a MoE layer's top-k sum runs inside the residual add + norm after it
# (``norm.ops.add_topk_rms_norm``: the same bits, one launch less per MoE layer, two with
# shared experts, whose output it adds as well). Off until it has run on a
# GPU: built and tested under the interpreter on 2026-12-04 (S10), when no device machine was
# lent (`benchmarks/device/with_constants.py`: moelora_dist.models.model:FUSE_TOPK_SUM=true).
FUSE_TOPK_SUM = False


def _attention_specs(cfg: ModelConfig, split: HeadSplit, p: str) -> dict[str, DenseModuleSpec]:
    H = cfg.hidden_size
    if cfg.attention == "mla":  # latent projections replicated, the per-head ones split
        m, N = cfg.mla, cfg.num_heads
        out = {f"{p}.kv_a_proj_with_mqa": DenseModuleSpec(H, m.kv_lora_rank + m.qk_rope_head_dim,
                                                          "replicated"),
               f"{p}.kv_b_proj": DenseModuleSpec(m.kv_lora_rank,
                                                 N * (m.qk_nope_head_dim + m.v_head_dim),
                                                 "column"),
               f"{p}.o_proj": DenseModuleSpec(N * m.v_head_dim, H, "row")}
        if m.q_lora_rank is None:
            out[f"{p}.q_proj"] = DenseModuleSpec(H, N * m.qk_head_dim, "column")
        else:
            out[f"{p}.q_a_proj"] = DenseModuleSpec(H, m.q_lora_rank, "replicated")
            out[f"{p}.q_b_proj"] = DenseModuleSpec(m.q_lora_rank, N * m.qk_head_dim, "column")
        return out
    D = cfg.head_dim
    kv_split = "column" if split.kv_sharded else "replicated"
    return {f"{p}.q_proj": DenseModuleSpec(H, cfg.num_heads * D, "column"),
            f"{p}.k_proj": DenseModuleSpec(H, cfg.num_kv_heads * D, kv_split),
            f"{p}.v_proj": DenseModuleSpec(H, cfg.num_kv_heads * D, kv_split),
            f"{p}.o_proj": DenseModuleSpec(cfg.num_heads * D, H, "row")}


def _mlp_specs(H: int, F_: int, p: str) -> dict[str, DenseModuleSpec]:
    return {f"{p}.gate_proj": DenseModuleSpec(H, F_, "column"),
            f"{p}.up_proj": DenseModuleSpec(H, F_, "column"),
            f"{p}.down_proj": DenseModuleSpec(F_, H, "row")}


def router_path(cfg: ModelConfig, layer: int) -> str:
    """The pool path of a MoE layer's router LoRA (``layers.{l}.mlp.gate`` / ``.router``)."""
    return f"layers.{layer}.mlp.{cfg.router_name}"


def dense_module_specs(cfg: ModelConfig, split: HeadSplit) -> dict[str, DenseModuleSpec]:
    """Every dense module an adapter may target, with its TP split.

    k/v are "replicated" in the pool when kv heads are replicated over ranks (fewer kv heads
    than ranks): the column rule would cut inside a head; the attention picks its head's rows.
    MoE layers: the router (replicated, like its weight) and the shared experts (split like a
    dense MLP); dense layers: the MLP.
    """
    H = cfg.hidden_size
    specs = {}
    for layer in range(cfg.num_layers):
        specs.update(_attention_specs(cfg, split, f"layers.{layer}.self_attn"))
        if not cfg.is_moe_layer(layer):
            specs.update(_mlp_specs(H, cfg.dense_intermediate, f"layers.{layer}.mlp"))
            continue
        specs[router_path(cfg, layer)] = DenseModuleSpec(H, cfg.num_experts, "replicated")
        if cfg.shared_intermediate:
            specs.update(_mlp_specs(H, cfg.shared_intermediate,
                                    f"layers.{layer}.mlp.shared_experts"))
    return specs


def activation_of(cfg: ModelConfig):
    """The experts' activation: a name, or gpt-oss's clamped SwiGLU with its constants."""
    if cfg.activation == "swiglu_oai":
        return Activation("swiglu_oai", cfg.swiglu_alpha, cfg.swiglu_limit)
    return cfg.activation


def router_spec_of(cfg: ModelConfig) -> RouterSpec:
    return RouterSpec(cfg.top_k, cfg.router, cfg.renormalize, cfg.n_group, cfg.topk_group,
                      cfg.routed_scaling_factor)


class MoELoRAModel:
    """One rank's part of a MoE causal LM with a multi-LoRA pool.

    Build with :meth:`build` from a weight source; run :meth:`forward` on a packed batch.
    """

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, pool: LoRAPool,
                 dtype: torch.dtype, backend: str | None = None,
                 max_positions: int | None = None):
        self.cfg, self.groups, self.pool, self.dtype = cfg, groups, pool, dtype
        self.device = groups.device
        # The kernels of every fused path (LoRA, attention, norms): Triton on CUDA,
        # references on CPU.
        self.backend = pick_backend(self.device, backend)
        self.split = HeadSplit.for_rank(cfg, groups.tp_size, groups.rank_layout.tp_rank)
        self.max_positions = max_positions or cfg.max_positions or DEFAULT_MAX_POSITIONS
        self.rope = rope_tables_for(cfg.rope, self.max_positions, self.device)
        self.embed_VH: torch.Tensor | None = None
        self.lm_head_VH: torch.Tensor | None = None
        self.final_norm_H: torch.Tensor | None = None
        self.layers: list[dict] = []

    @contextlib.contextmanager
    def backend_as(self, backend: str):
        """Run the LoRA paths on ``backend`` inside the block (e.g. the PyTorch references on
        a GPU, to check the kernels against them); the previous backend after."""
        parts = [layer[k] for layer in self.layers for k in ("moe", "attn") if k in layer]
        before = self.backend
        self.backend = pick_backend(self.device, backend)
        for part in parts:
            part.backend = self.backend
        try:
            yield
        finally:
            self.backend = before
            for part in parts:
                part.backend = before

    @classmethod
    def build(cls, cfg: ModelConfig, groups: ParallelGroups, source, *, dtype: torch.dtype,
              max_loras: int = 8, max_rank: int = 64, dispatcher: str = "auto",
              progress: bool = True, backend: str | None = None,
              max_positions: int | None = None) -> "MoELoRAModel":
        """Read this rank's weights from ``source`` (:mod:`.weights`) and make the pool.

        ``max_positions``: the rotary tables' length (default: the config's
        ``max_position_embeddings``, else 8192).

        Raises :class:`~.config.ModelConfigError` / ``LayoutError`` when the layout cannot
        split this model (heads, kv heads, experts or intermediate not divisible).
        """
        rl, dev = groups.rank_layout, groups.device
        groups.layout.check_model(cfg.num_experts, cfg.moe_intermediate)
        check_fp8_layout(cfg, groups.tp_size, groups.layout.ep)
        split = HeadSplit.for_rank(cfg, groups.tp_size, rl.tp_rank)
        pool = LoRAPool(
            PoolConfig(max_loras=max_loras, max_rank=max_rank, dtype=dtype, device=dev), rl,
            moe_layers={i: MoELayerSpec(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate)
                        for i in cfg.moe_layers},
            dense_modules=dense_module_specs(cfg, split))
        self = cls(cfg, groups, pool, dtype, backend, max_positions)
        to = dict(device=dev, dtype=dtype)
        place = lambda t: place_weight(t, dev, dtype)  # noqa: E731  (FP8 weights keep their dtype)
        # gpt-oss's norms stay fp32 (transformers' _keep_in_fp32_modules) and scale in fp32.
        norm_to = dict(device=dev, dtype=torch.float32 if cfg.norm_weight_first else dtype)
        self.embed_VH = source.embed().to(**to)
        # Tied embeddings share one tensor (a [V, H] copy is ~0.6 GB at a 150k vocabulary).
        self.lm_head_VH = (self.embed_VH if cfg.tie_word_embeddings
                           else place(source.lm_head()))
        self.final_norm_H = source.norm("model.norm").to(**norm_to)
        shard = rl.moe_shard(cfg.num_experts, cfg.moe_intermediate)
        attention_cls = TPMLA if cfg.attention == "mla" else TPAttention
        mxfp4_values = 0
        try:
            bar = tqdm(range(cfg.num_layers), desc="loading layers", unit="layer",
                       disable=not (progress and groups.is_rank0))
            for i in bar:
                attn_w = {k: place(v) for k, v in source.attention(i, split).items()}
                layer = {
                    "ln1": source.norm(f"model.layers.{i}.input_layernorm").to(**norm_to),
                    "ln2": source.norm(f"model.layers.{i}.post_attention_layernorm").to(
                        **norm_to),
                    "attn": attention_cls(cfg, i, split, attn_w, groups.tp_group, self.backend),
                }
                if cfg.is_moe_layer(i):
                    w = source.experts(i, shard)
                    mxfp4_values += w.mxfp4_values
                    layer["moe"] = LoRAMoE(self._moe_block(w, shard), pool, i, groups,
                                           dispatcher=dispatcher, backend=self.backend)
                    if cfg.shared_intermediate:
                        sw = source.dense_mlp(i, groups.tp_size, rl.tp_rank,
                                              "mlp.shared_experts", cfg.shared_intermediate)
                        layer["shared"] = DenseMLP(i, {k: place(v) for k, v in sw.items()},
                                                   groups.tp_group, "mlp.shared_experts")
                    layer["router_path"] = router_path(cfg, i)
                else:
                    mlp_w = source.dense_mlp(i, groups.tp_size, rl.tp_rank)
                    layer["mlp"] = DenseMLP(i, {k: place(v) for k, v in mlp_w.items()},
                                            groups.tp_group)
                self.layers.append(layer)
            source.check_all_placed()
        finally:
            source.close()
        if groups.is_rank0:
            log.info("%s: %d layers (%d MoE), %s, LoRA pool %d slots x rank %d = %.1f MiB per rank",
                     cfg.arch, cfg.num_layers, len(cfg.moe_layers), groups.layout, max_loras,
                     max_rank, pool.nbytes() / 2**20)
            log.info("%s", describe_memory(self))
            if mxfp4_values:
                log.info("%s", mxfp4_note(mxfp4_values, dtype))
        return self

    def _moe_block(self, w, shard) -> MoEBlock:
        """This rank's MoE block from :class:`~.moe_weights.RankMoEWeights` (family variants
        from the config; the router and correction bias in fp32 where the family keeps them)."""
        cfg, dev, dtype = self.cfg, self.device, self.dtype
        to = dict(device=dev, dtype=dtype)
        opt = lambda t, **kw: None if t is None else t.to(**(kw or to))  # noqa: E731
        return MoEBlock(
            w.router_EH.to(device=dev, dtype=torch.float32 if cfg.router_fp32 else dtype),
            place_weight(w.w_gate_up, dev, dtype), place_weight(w.w_down, dev, dtype),
            top_k=cfg.top_k,
            renormalize=cfg.renormalize, shard=shard, activation=activation_of(cfg),
            router=router_spec_of(cfg), router_bias_E=opt(w.router_bias_E),
            correction_bias_E=opt(w.correction_bias_E, device=dev, dtype=torch.float32),
            b_gate_up=opt(w.b_gate_up), b_down=opt(w.b_down), router_fp32=cfg.router_fp32)

    def new_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        """A paged KV cache of ``num_pages`` pages of ``page_size`` tokens (this rank's kv
        heads, every layer). MLA's pages hold ``qk_head_dim`` keys and values (the values
        zero-padded from ``v_head_dim``: see :mod:`.mla`)."""
        return PagedKVCache(self.cfg.num_layers, num_pages, page_size, self.split.num_kv,
                            self.cfg.head_dim, self.dtype, self.device)

    def page_bytes(self, page_size: int) -> int:
        """Device bytes of one KV page (every layer, keys and values) on this rank."""
        return PagedKVCache.page_bytes(self.cfg.num_layers, page_size, self.split.num_kv,
                                       self.cfg.head_dim, self.dtype)

    def _add_norm(self, h_TH, delta_TH, weight_H):
        if isinstance(delta_TH, PairOutputs):  # a one-GPU MoE layer's outputs, not summed
            if self.backend == "triton" and not self.cfg.norm_weight_first:
                from moelora_dist.kernels.norm import ops  # Triton: optional off x86-64 Linux

                return ops.add_topk_rms_norm(h_TH, delta_TH, weight_H, self.cfg.rms_norm_eps)
            delta_TH = delta_TH.sum()
        lora = None
        if isinstance(delta_TH, DeferredLoRA):  # o's expand, fused into the kernel below
            if self.backend == "triton" and not self.cfg.norm_weight_first:
                delta_TH, lora = delta_TH.base, delta_TH.pending.token_lora()
            else:
                delta_TH = delta_TH.resolve()
        if self.cfg.norm_weight_first:  # gpt-oss's RMSNorm (weight x fp32 value, then cast)
            if delta_TH is not None:
                h_TH.add_(delta_TH)
            return rms_norm(h_TH, weight_H, self.cfg.rms_norm_eps, weight_first=True)
        if self.backend == "triton":
            from moelora_dist.kernels.norm import ops  # Triton: optional off x86-64 Linux

            return ops.add_rms_norm(h_TH, delta_TH, weight_H, self.cfg.rms_norm_eps, lora=lora)
        return norm_naive.add_rms_norm(h_TH, delta_TH, weight_H, self.cfg.rms_norm_eps)

    @torch.no_grad()
    def forward(self, input_ids_T: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache,
                batch_info: BatchInfo, router_lora: bool | None = None) -> torch.Tensor:
        """Hidden states after the final norm.

        Each residual add is fused with the norm that follows it (one kernel on the GPU):
        ``h += attn(x); x = norm2(h); h += mlp(x); x = norm1_next(h)``, the last norm being
        the final one.

        Args:
            input_ids_T: ``[T]`` int64 new tokens of every sequence, packed.
            batch: their layout (:class:`ForwardBatch`); cache: the pages it indexes (this
                forward's keys and values are written into them).
            batch_info: per-token adapter slots from ``build_batch_info``.
            router_lora: run the router LoRA on every MoE layer (True: a static step, whose
                graph must stay valid for adapters loaded later; zero for adapters without
                one), on none (False), or where a resident adapter has one (None, eager).
        Returns:
            ``[T, H]`` in the model dtype, identical on every TP rank.
        """
        lora = DenseLoRA(self.pool, batch_info, self.backend) if batch_info.any_lora() else None
        h = self.embed_VH[input_ids_T]
        x = self._add_norm(h, None, self.layers[0]["ln1"])
        for i, layer in enumerate(self.layers):
            x = self._add_norm(h, layer["attn"].forward(x, batch, cache, self.rope, lora),
                               layer["ln2"])
            y = self._moe(layer, x, batch_info, lora, router_lora) if "moe" in layer else \
                layer["mlp"].forward(x, lora)
            nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.final_norm_H
            x = self._add_norm(h, y, nxt)
        return x

    def _moe(self, layer: dict, x_TH: torch.Tensor, batch_info: BatchInfo,
             lora: DenseLoRA | None, router_lora: bool | None) -> torch.Tensor:
        """Routed experts (router LoRA on the logits: see ``forward``'s ``router_lora``) plus
        the shared experts, which take the same input and no gate."""
        moe, logits, path = layer["moe"], None, layer["router_path"]
        run_router = self.pool.targets(path) if router_lora is None else router_lora
        if lora is not None and run_router:
            logits = lora.apply(moe.base.router_logits(x_TH), x_TH, path)
        # The top-k sum (and the shared experts' add) inside the next residual add + norm
        # (FUSE_TOPK_SUM).
        fuse = FUSE_TOPK_SUM and self.backend == "triton" and not self.cfg.norm_weight_first
        y = moe(x_TH, batch_info, logits, sum_pairs=not fuse)
        if "shared" in layer:
            shared = layer["shared"].forward(x_TH, lora)
            y = y._replace(plus_TH=shared) if isinstance(y, PairOutputs) else y + shared
        return y

    def router_paths(self) -> list[str]:
        """The pool paths of every MoE layer's router LoRA."""
        return [layer["router_path"] for layer in self.layers if "moe" in layer]

    def logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[N, V]`` float32 logits (the GEMM runs in the model dtype, as HF)."""
        return base_linear(hidden_NH, self.lm_head_VH).float()
