"""Dense (non-MoE) MLPs, split over TP, with multi-LoRA: the dense layers of hybrid models and
the shared experts of a MoE layer.

Legend: T tokens, H hidden, F dense intermediate (``F_l = F / tp`` on one rank).

Qwen3-MoE can interleave plain SwiGLU MLPs (``mlp_only_layers``, ``decoder_sparse_step``);
DeepSeek-V3 and GLM-4.5 have dense MLPs below ``first_k_dense_replace`` and, in every MoE
layer, shared experts (``mlp.shared_experts``: a SwiGLU MLP of ``n_shared_experts *
moe_intermediate_size`` added to the routed output without a gate). Either way gate/up are
column parallel, down is row parallel, and the partial output is all-reduced over the TP
group. Such an MLP has no expert weights and no MoE LoRA buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.lora_linear import DenseLoRA, base_linear, fuse_rows, linear_with_lora
from moelora_dist.models.moe_weights import RankMoEWeights, load_moe_weights
from moelora_dist.models.moe_weights_fp8 import experts_stored_fp8, load_moe_weights_fp8


class DenseMLP:
    """``w_gate``/``w_up`` ``[F_l, H]`` and ``w_down`` ``[H, F_l]`` of one rank; gate and up
    concatenated at construction into ``w["gate_up_proj"] [2 F_l, H]`` (one GEMM) when both are
    tensors or both block-FP8 (:func:`.lora_linear.fuse_rows`).

    ``module``: the MLP's name inside the decoder layer (``mlp``, or ``mlp.shared_experts``):
    its LoRA pool paths are ``layers.{layer}.{module}.{gate,up,down}_proj``.
    """

    def __init__(self, layer: int, weights: dict[str, torch.Tensor], tp_group=None,
                 module: str = "mlp"):
        self.layer, self.tp_group = layer, tp_group
        self.prefix = f"layers.{layer}.{module}"
        self.w = dict(weights)
        self.inter = self.w["gate_proj"].shape[0]
        # gate and up in one GEMM (w["gate_proj"], w["up_proj"] become views of its rows)
        self.fused = fuse_rows(self.w, ("gate_proj", "up_proj"), "gate_up_proj")

    def forward(self, x_TH: torch.Tensor, lora: DenseLoRA | None = None) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]``, summed over TP ranks. ``lora``: this forward's
        :class:`.lora_linear.DenseLoRA`, or None when no token uses an adapter."""
        p = self.prefix
        # gate and up read the same x: one shrink launch, beside their base GEMMs
        pending = (lora.begin(x_TH, [(f"{p}.gate_proj", None), (f"{p}.up_proj", None)])
                   if lora is not None else None)
        if self.fused:
            gate, up = base_linear(x_TH, self.w["gate_up_proj"]).split(self.inter, dim=1)
        else:
            gate = base_linear(x_TH, self.w["gate_proj"])
            up = base_linear(x_TH, self.w["up_proj"])
        if pending is not None:
            gate, up = pending.finish([gate, up])
        y = linear_with_lora(F.silu(gate) * up, self.w["down_proj"], None, lora,
                             f"{p}.down_proj")
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(y, group=self.tp_group)
        return y


def dense_mlp_slice(cfg: ModelConfig, tp: int, tp_rank: int,
                    intermediate: int | None = None) -> tuple[int, int]:
    """Rows ``[start, end)`` of the dense intermediate (``intermediate``, default the dense
    layers' ``cfg.dense_intermediate``) owned by ``tp_rank``."""
    F_ = intermediate or cfg.dense_intermediate
    if F_ % tp:
        what = "of the dense MLP layers" if intermediate is None else "of the shared experts"
        raise ModelConfigError(f"intermediate size {F_} {what} is not divisible by tp={tp}")
    n = F_ // tp
    return tp_rank * n, (tp_rank + 1) * n


def load_dense_mlp_weights(reader, cfg: ModelConfig, layer: int, tp: int, tp_rank: int,
                           dtype: torch.dtype, module: str = "mlp",
                           intermediate: int | None = None) -> dict[str, torch.Tensor]:
    """Read this rank's slices of the dense MLP ``model.layers.{layer}.{module}``."""
    F_ = intermediate or cfg.dense_intermediate
    start, end = dense_mlp_slice(cfg, tp, tp_rank, F_)
    p = f"model.layers.{layer}.{module}"
    H = cfg.hidden_size
    proj = lambda name, **kw: read_linear(reader, cfg, f"{p}.{name}", dtype=dtype, **kw)  # noqa: E731
    return {  # tensors, or BlockFP8Weight for an FP8 checkpoint's projections
        "gate_proj": proj("gate_proj", rows=(start, end), expect_shape=(F_, H)),
        "up_proj": proj("up_proj", rows=(start, end), expect_shape=(F_, H)),
        "down_proj": proj("down_proj", cols=(start, end), expect_shape=(H, F_)),
    }


def load_expert_weights(reader, cfg: ModelConfig, layer: int, shard,
                        dtype: torch.dtype) -> RankMoEWeights:
    """This rank's experts of one MoE layer (its experts, its rows of ``I``), read sliced.

    Key layouts (per expert, Mixtral ``w1/w3/w2``, fused 3-D, gpt-oss's interleaved and MXFP4
    experts) are handled by :func:`moelora_dist.models.moe_weights.load_moe_weights`; here
    only the block's name is resolved: ``block_sparse_moe`` (what transformers writes for
    Mixtral) or ``mlp``.

    Args:
        shard: a :class:`moelora_dist.parallel.layout.MoEShard`.
    Returns:
        :class:`~moelora_dist.models.moe_weights.RankMoEWeights`: ``router_EH [E, H]`` (all
        experts: every rank routes every token; fp32 for DeepSeek-V3 / GLM-4.5),
        ``w_gate_up [E_l, 2*I_l, H]`` (gate rows, then up rows), ``w_down [E_l, H, I_l]`` and
        the family's biases.
    """
    router = cfg.router_name
    prefixes = [f"model.layers.{layer}.{m}" for m in (cfg.moe_prefix, "mlp", "block_sparse_moe")]
    prefix = next((p for p in dict.fromkeys(prefixes) if reader.has(f"{p}.{router}.weight")),
                  None)
    if prefix is None:
        raise ModelConfigError(f"config.json makes layer {layer} a MoE layer but the checkpoint "
                               f"has no router weight {prefixes[0]}.{router}.weight")
    if cfg.expert_layout == "standard" and experts_stored_fp8(reader, cfg, prefix):
        w = load_moe_weights_fp8(reader, cfg, prefix, shard, hidden=cfg.hidden_size, dtype=dtype)
        E, H = cfg.num_experts, cfg.hidden_size
        if cfg.router_fp32:  # DeepSeek-V3 / GLM-4.5 keep the router in fp32
            w.router_EH = reader.get(f"{prefix}.gate.weight", dtype=torch.float32,
                                     expect_shape=(E, H))
        if cfg.correction_bias:
            w.correction_bias_E = reader.get(f"{prefix}.gate.e_score_correction_bias",
                                             dtype=torch.float32, expect_shape=(E,))
        return w
    return load_moe_weights(reader, prefix, shard, hidden=cfg.hidden_size, dtype=dtype,
                            layout=cfg.expert_layout, correction_bias=cfg.correction_bias,
                            router_dtype=torch.float32 if cfg.router_fp32 else None)
