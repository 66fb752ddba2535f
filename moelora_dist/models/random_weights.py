"""Seeded random weights at the shape of any served model, cut to this rank: benchmarks at
the shape of a model too big to download, and the layout tests that need no checkpoint.

    source = RandomWeights(cfg, torch.bfloat16, "cuda")
    source = RandomFP8Weights(cfg_fp8, torch.bfloat16, "cuda")   # as its FP8 checkpoint loads
    model = MoELoRAModel.build(cfg, groups, source, dtype=torch.bfloat16)

Legend: V vocab, H hidden, E experts, E_l local experts, I intermediate, F dense (or shared)
intermediate, D head dim, N / K a linear's output rows / input columns.

Full tensors are drawn and then sliced, so every rank agrees on the replicated ones (the
router, MLA's latent projections) and on the slices; the draw order of the Qwen3-MoE /
Mixtral / OLMoE tensors is the one this class always had, the family extras (biases, sinks,
correction bias) are drawn after them.

:class:`RandomFP8Weights` draws the same values and hands them over as an FP8 checkpoint of
them would be loaded: every linear the config's ``quantization_config`` converts is
block-quantized in full (:func:`~moelora_dist.kernels.block_fp8.naive.quantize_weight`, 128x128
blocks, as the published checkpoints were made) and then cut to this rank by the checkpoint
loader's own :func:`~moelora_dist.models.fp8_weights.read_block_fp8` (its checks, its
re-blocking of row cuts), so the model is built from the same
:class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight` objects a checkpoint gives.
"""

from __future__ import annotations

import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.kernels.block_fp8.naive import quantize_weight
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.models.attention import HeadSplit
from moelora_dist.models.fp8_weights import maybe_dequantize, read_block_fp8, stored_keys
from moelora_dist.models.mla import mla_rank_slices, mla_shapes
from moelora_dist.models.mlp import dense_mlp_slice
from moelora_dist.models.moe_weights import RankMoEWeights
from moelora_dist.parallel.sharding import cut_gate_up


class RandomWeights:
    """Seeded ``N(0, std^2)`` weights (norms are ones) cut to this rank, drawn on ``device``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0,
                 std: float = 0.02):
        self.cfg, self.dtype, self.device, self.std = cfg, dtype, torch.device(device), std
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def check_all_placed(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * self.std * scale).to(self.dtype)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=self.dtype, device=self.device)

    def _linear(self, key: str, w_NK: torch.Tensor, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None):
        """This rank's ``rows`` / ``cols`` of the full linear weight ``w_NK`` (checkpoint
        module name ``key``, e.g. ``model.layers.0.self_attn.q_proj``)."""
        if rows is not None:
            w_NK = w_NK[rows[0]:rows[1]]
        if cols is not None:
            w_NK = w_NK[:, cols[0]:cols[1]]
        return w_NK.contiguous()

    def embed(self) -> torch.Tensor:
        return self._randn(self.cfg.vocab_size, self.cfg.hidden_size)

    def lm_head(self) -> torch.Tensor:
        return self._linear("lm_head", self._randn(self.cfg.vocab_size, self.cfg.hidden_size))

    def norm(self, name: str) -> torch.Tensor:
        return self._ones(self.cfg.hidden_size)

    def attention(self, layer: int, split: HeadSplit) -> dict[str, torch.Tensor]:
        cfg, D, H = self.cfg, self.cfg.head_dim, self.cfg.hidden_size
        p = f"model.layers.{layer}.self_attn"
        if cfg.attention == "mla":
            cuts, w = mla_rank_slices(cfg, split), {}
            for name, shape in mla_shapes(cfg).items():
                if name.endswith(("layernorm", ".bias")):
                    w[name] = (self._ones(shape[0]) if name.endswith("layernorm")
                               else self._randn(*shape))
                    continue
                dim, lo, hi = cuts.get(name, (0, None, None))
                cut = None if lo is None else (lo, hi)
                w[name] = self._linear(f"{p}.{name}", self._randn(*shape),
                                       rows=cut if dim == 0 else None,
                                       cols=cut if dim == 1 else None)
            return w
        q_rows = (split.q_start * D, (split.q_start + split.num_q) * D)
        kv_rows = (split.kv_start * D, (split.kv_start + split.num_kv) * D)
        q, kv = slice(*q_rows), slice(*kv_rows)
        w = {
            "q_proj": self._linear(f"{p}.q_proj", self._randn(cfg.num_heads * D, H), rows=q_rows),
            "k_proj": self._linear(f"{p}.k_proj", self._randn(cfg.num_kv_heads * D, H),
                                   rows=kv_rows),
            "v_proj": self._linear(f"{p}.v_proj", self._randn(cfg.num_kv_heads * D, H),
                                   rows=kv_rows),
            "o_proj": self._linear(f"{p}.o_proj", self._randn(H, cfg.num_heads * D), cols=q_rows),
        }
        if cfg.qk_norm == "head":
            w["q_norm"], w["k_norm"] = self._ones(D), self._ones(D)
        elif cfg.qk_norm == "full":
            w["q_norm"], w["k_norm"] = self._ones(split.num_q * D), self._ones(split.num_kv * D)
        if cfg.attention_bias:
            w["q_proj.bias"] = self._randn(cfg.num_heads * D)[q].contiguous()
            w["k_proj.bias"] = self._randn(cfg.num_kv_heads * D)[kv].contiguous()
            w["v_proj.bias"] = self._randn(cfg.num_kv_heads * D)[kv].contiguous()
            if cfg.o_bias:
                w["o_proj.bias"] = self._randn(H)
        if cfg.sinks:
            heads = slice(split.q_start, split.q_start + split.num_q)
            w["sinks"] = self._randn(cfg.num_heads, scale=1 / self.std)[heads].contiguous()
        return w

    def dense_mlp(self, layer: int, tp: int, tp_rank: int, module: str = "mlp",
                  intermediate: int | None = None) -> dict[str, torch.Tensor]:
        F_ = intermediate or self.cfg.dense_intermediate
        s = dense_mlp_slice(self.cfg, tp, tp_rank, F_)
        H, p = self.cfg.hidden_size, f"model.layers.{layer}.{module}"
        return {"gate_proj": self._linear(f"{p}.gate_proj", self._randn(F_, H), rows=s),
                "up_proj": self._linear(f"{p}.up_proj", self._randn(F_, H), rows=s),
                "down_proj": self._linear(f"{p}.down_proj", self._randn(H, F_), cols=s)}

    def experts(self, layer: int, shard) -> RankMoEWeights:
        cfg = self.cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
        router = self._randn(E, H)
        out = RankMoEWeights(router, *self._local_experts(layer, shard), "random")
        if cfg.router_fp32:
            out.router_EH = out.router_EH.float()
        if cfg.correction_bias:  # scores are sigmoids near 0.5: a bias of 0.1 changes choices
            out.correction_bias_E = self._randn(E, scale=0.1 / self.std).float()
        if cfg.router_bias:
            out.router_bias_E = self._randn(E)
        if cfg.expert_bias:
            ex = shard.expert_slice
            out.b_gate_up = cut_gate_up(self._randn(E, 2 * I)[ex], shard, dim=1).contiguous()
            out.b_down = self._randn(E, H)[ex].contiguous()
        return out

    def _expert_draws(self, shard):
        """``(gate_up [2I, H], down [H, I])`` in full for each local expert, in order; the
        generator advances over the other experts identically on every rank."""
        E, H, I = self.cfg.num_experts, self.cfg.hidden_size, self.cfg.moe_intermediate
        for _ in range(shard.expert_start):
            self._randn(2 * I, H), self._randn(H, I)
        for _ in range(shard.num_local_experts):
            yield self._randn(2 * I, H), self._randn(H, I)
        for _ in range(shard.expert_end, E):
            self._randn(2 * I, H), self._randn(H, I)

    def _local_experts(self, layer: int, shard):
        """``w_gate_up [E_l, 2 I_l, H]`` and ``w_down [E_l, H, I_l]`` of this rank."""
        # Cut each expert as it is drawn: memory stays at one full expert beyond the result,
        # which matters at Qwen3-30B-A3B size on one GPU.
        gate_up, down = [], []
        for gu, d in self._expert_draws(shard):
            gate_up.append(cut_gate_up(gu, shard, dim=0))
            down.append(d[:, shard.i_slice])
        return torch.stack(gate_up).contiguous(), torch.stack(down).contiguous()


class _HeldTensors:
    """The reads :func:`~moelora_dist.models.fp8_weights.read_block_fp8` makes of a checkpoint,
    served from block-FP8 weights in memory, stored under the names a checkpoint gives them
    (``{module: BlockFP8Weight}`` -> ``<module>.weight`` + ``<module>.weight_scale_inv``)."""

    DTYPE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}

    def __init__(self, modules: dict[str, BlockFP8Weight]):
        self.tensors = {}
        for module, w in modules.items():
            wkey, skey = stored_keys(module)
            self.tensors[wkey], self.tensors[skey] = w.weight, w.scale_inv

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> list[int]:
        return list(self.tensors[key].shape)

    def dtype_name(self, key: str) -> str:
        return self.DTYPE_NAMES[self.tensors[key].dtype]

    def get_raw(self, key: str, *index) -> torch.Tensor:
        return self.tensors[key][index]


class RandomFP8Weights(RandomWeights):
    """:class:`RandomWeights`' values as their fine-grained FP8 checkpoint would load.

    ``cfg.fp8`` (a ``quantization_config`` with ``quant_method "fp8"``) decides what is FP8,
    as it does for a checkpoint: every linear it converts (q/k/v/o and MLA's projections, the
    routed experts, dense MLPs and shared experts; ``lm_head`` only when
    ``modules_to_not_convert`` is given without it) becomes a
    :class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight` (e4m3 ``[N, K]`` + fp32 scales
    ``[ceil(N/128), ceil(K/128)]``, quantized from the drawn ``dtype`` values); embeddings,
    norms, routers, biases and sinks stay in ``dtype``, as transformers keeps them. Gate and up
    are quantized as two weights (``experts.{e}.gate_proj`` / ``up_proj``, the per-expert
    layout of Qwen3-30B-A3B-FP8). ``cfg.fp8.dequantize``: the same weights dequantized to
    ``dtype`` (``--dequantize-fp8``).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0,
                 std: float = 0.02):
        if cfg.fp8 is None:
            raise ValueError("RandomFP8Weights needs a model config with an FP8 "
                             "quantization_config (quant_method \"fp8\", weight_block_size "
                             "[128, 128]); this one has none")
        if cfg.num_experts and cfg.expert_layout != "standard":
            raise ValueError(f"{cfg.arch}: its {cfg.expert_layout} expert layout has no FP8 "
                             "checkpoint path (only standard gate/up/down experts are served in "
                             "FP8); use bf16 random weights")
        super().__init__(cfg, dtype, device, seed, std)

    def _linear(self, key, w_NK, rows=None, cols=None):
        if not self.cfg.fp8.converts(key):
            return super()._linear(key, w_NK, rows, cols)
        held = _HeldTensors({key: quantize_weight(w_NK, self.cfg.fp8.scale_fmt)})
        r0, r1 = rows or (None, None)
        w = read_block_fp8(held, self.cfg, [(key, r0, r1)], cols=cols)
        return maybe_dequantize(w, self.cfg, self.dtype)

    def _local_experts(self, layer, shard):
        cfg, prefix = self.cfg, f"model.layers.{layer}.{self.cfg.moe_prefix}.experts"
        if not cfg.fp8.converts(prefix):
            return super()._local_experts(layer, shard)
        E_l, H, I = shard.num_local_experts, cfg.hidden_size, cfg.moe_intermediate
        # Every local expert in full (the rows a checkpoint stores), then quantized at once:
        # the blocks are those of one expert's weight, the leading dim only batches them.
        gu = torch.empty(E_l, 2 * I, H, dtype=self.dtype, device=self.device)
        d = torch.empty(E_l, H, I, dtype=self.dtype, device=self.device)
        for e, (gu_e, d_e) in enumerate(self._expert_draws(shard)):
            gu[e], d[e] = gu_e, d_e
        held = _HeldTensors({f"{prefix}.{name}": quantize_weight(t, cfg.fp8.scale_fmt)
                             for name, t in (("gate_proj", gu[:, :I]), ("up_proj", gu[:, I:]),
                                             ("down_proj", d))})
        del gu, d
        g, experts = shard.gate_up_slices[0], (slice(None),)
        gate_up = read_block_fp8(held, cfg, [(f"{prefix}.gate_proj", g.start, g.stop),
                                               (f"{prefix}.up_proj", g.start, g.stop)],
                                 lead=experts, expect_shape=(I, H))
        down = read_block_fp8(held, cfg, [(f"{prefix}.down_proj", None, None)], lead=experts,
                              cols=(shard.i_start, shard.i_end), expect_shape=(H, I))
        return tuple(maybe_dequantize(w, cfg, self.dtype) for w in (gate_up, down))
