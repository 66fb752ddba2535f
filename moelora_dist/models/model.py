"""The decoder stack: embeddings, attention + (MoE | dense MLP) layers, final norm, LM head.

Legend: T tokens (packed over requests), H hidden, V vocab, N positions whose logits are wanted.

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
from moelora_dist.lora.batch_info import BatchInfo
from moelora_dist.lora.pool import DenseModuleSpec, LoRAPool, MoELayerSpec, PoolConfig
from moelora_dist.models.attention import HeadSplit, TPAttention
from moelora_dist.kernels.norm import naive as norm_naive
from moelora_dist.kernels.paged_attention.naive import rope_tables
from moelora_dist.models.batch import ForwardBatch, PagedKVCache
from moelora_dist.models.fp8_layout import check_fp8_layout
from moelora_dist.models.lora_linear import DenseLoRA, base_linear
from moelora_dist.models.memory import describe_memory, place_weight
from moelora_dist.models.mlp import DenseMLP
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.experts import pick_backend
from moelora_dist.moe.layer import LoRAMoE
from moelora_dist.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)
DEFAULT_MAX_POSITIONS = 8192  # rotary table length when config.json does not say


def dense_module_specs(cfg: ModelConfig, split: HeadSplit) -> dict[str, DenseModuleSpec]:
    """Every dense module an adapter may target, with its TP split.

    k/v are "replicated" in the pool when kv heads are replicated over ranks (fewer kv heads
    than ranks): the column rule would cut inside a head; the attention picks its head's rows.
    """
    H, D = cfg.hidden_size, cfg.head_dim
    kv_split = "column" if split.kv_sharded else "replicated"
    specs = {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        specs[f"{p}.q_proj"] = DenseModuleSpec(H, cfg.num_heads * D, "column")
        specs[f"{p}.k_proj"] = DenseModuleSpec(H, cfg.num_kv_heads * D, kv_split)
        specs[f"{p}.v_proj"] = DenseModuleSpec(H, cfg.num_kv_heads * D, kv_split)
        specs[f"{p}.o_proj"] = DenseModuleSpec(cfg.num_heads * D, H, "row")
        if not cfg.is_moe_layer(layer):
            F_ = cfg.dense_intermediate
            specs[f"layers.{layer}.mlp.gate_proj"] = DenseModuleSpec(H, F_, "column")
            specs[f"layers.{layer}.mlp.up_proj"] = DenseModuleSpec(H, F_, "column")
            specs[f"layers.{layer}.mlp.down_proj"] = DenseModuleSpec(F_, H, "row")
    return specs


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
        self.rope = rope_tables(cfg.head_dim, cfg.rope_theta, self.max_positions, self.device)
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
        self.embed_VH = source.embed().to(**to)
        # Tied embeddings share one tensor (a [V, H] copy is ~0.6 GB at a 150k vocabulary).
        self.lm_head_VH = (self.embed_VH if cfg.tie_word_embeddings
                           else place(source.lm_head()))
        self.final_norm_H = source.norm("model.norm").to(**to)
        shard = rl.moe_shard(cfg.num_experts, cfg.moe_intermediate)
        try:
            bar = tqdm(range(cfg.num_layers), desc="loading layers", unit="layer",
                       disable=not (progress and groups.is_rank0))
            for i in bar:
                attn_w = {k: place(v) for k, v in source.attention(i, split).items()}
                layer = {
                    "ln1": source.norm(f"model.layers.{i}.input_layernorm").to(**to),
                    "ln2": source.norm(f"model.layers.{i}.post_attention_layernorm").to(**to),
                    "attn": TPAttention(cfg, i, split, attn_w, groups.tp_group, self.backend),
                }
                if cfg.is_moe_layer(i):
                    router, gate_up, down = (place(t) for t in source.experts(i, shard))
                    base = MoEBlock(router, gate_up, down, top_k=cfg.top_k,
                                    renormalize=cfg.renormalize, shard=shard,
                                    activation=cfg.activation)
                    layer["moe"] = LoRAMoE(base, pool, i, groups, dispatcher=dispatcher,
                                           backend=self.backend)
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
        return self

    def new_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        """A paged KV cache of ``num_pages`` pages of ``page_size`` tokens (this rank's kv
        heads, every layer)."""
        return PagedKVCache(self.cfg.num_layers, num_pages, page_size, self.split.num_kv,
                            self.cfg.head_dim, self.dtype, self.device)

    def page_bytes(self, page_size: int) -> int:
        """Device bytes of one KV page (every layer, keys and values) on this rank."""
        return PagedKVCache.page_bytes(self.cfg.num_layers, page_size, self.split.num_kv,
                                       self.cfg.head_dim, self.dtype)

    def _add_norm(self, h_TH, delta_TH, weight_H):
        if self.backend == "triton":
            from moelora_dist.kernels.norm import ops  # Triton: optional off x86-64 Linux

            return ops.add_rms_norm(h_TH, delta_TH, weight_H, self.cfg.rms_norm_eps)
        return norm_naive.add_rms_norm(h_TH, delta_TH, weight_H, self.cfg.rms_norm_eps)

    @torch.no_grad()
    def forward(self, input_ids_T: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache,
                batch_info: BatchInfo) -> torch.Tensor:
        """Hidden states after the final norm.

        Each residual add is fused with the norm that follows it (one kernel on the GPU):
        ``h += attn(x); x = norm2(h); h += mlp(x); x = norm1_next(h)``, the last norm being
        the final one.

        Args:
            input_ids_T: ``[T]`` int64 new tokens of every sequence, packed.
            batch: their layout (:class:`ForwardBatch`); cache: the pages it indexes (this
                forward's keys and values are written into them).
            batch_info: per-token adapter slots from ``build_batch_info``.
        Returns:
            ``[T, H]`` in the model dtype, identical on every TP rank.
        """
        lora = DenseLoRA(self.pool, batch_info, self.backend) if batch_info.any_lora() else None
        h = self.embed_VH[input_ids_T]
        x = self._add_norm(h, None, self.layers[0]["ln1"])
        for i, layer in enumerate(self.layers):
            x = self._add_norm(h, layer["attn"].forward(x, batch, cache, self.rope, lora),
                               layer["ln2"])
            y = layer["moe"](x, batch_info) if "moe" in layer else layer["mlp"].forward(x, lora)
            nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.final_norm_H
            x = self._add_norm(h, y, nxt)
        return x

    def logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[N, V]`` float32 logits (the GEMM runs in the model dtype, as HF)."""
        return base_linear(hidden_NH, self.lm_head_VH).float()
