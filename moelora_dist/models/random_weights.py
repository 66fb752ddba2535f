"""Seeded random weights at the shape of any served model, cut to this rank: benchmarks at
the shape of a model too big to download, and the layout tests that need no checkpoint.

Legend: V vocab, H hidden, E experts, E_l local experts, I intermediate, F dense (or shared)
intermediate, D head dim.

Full tensors are drawn and then sliced, so every rank agrees on the replicated ones (the
router, MLA's latent projections) and on the slices; the draw order of the Qwen3-MoE /
Mixtral / OLMoE tensors is the one this class always had, the family extras (biases, sinks,
correction bias) are drawn after them.
"""

from __future__ import annotations

import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.models.attention import HeadSplit
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

    def embed(self) -> torch.Tensor:
        return self._randn(self.cfg.vocab_size, self.cfg.hidden_size)

    def lm_head(self) -> torch.Tensor:
        return self._randn(self.cfg.vocab_size, self.cfg.hidden_size)

    def norm(self, name: str) -> torch.Tensor:
        return self._ones(self.cfg.hidden_size)

    def attention(self, layer: int, split: HeadSplit) -> dict[str, torch.Tensor]:
        cfg, D, H = self.cfg, self.cfg.head_dim, self.cfg.hidden_size
        if cfg.attention == "mla":
            cuts, w = mla_rank_slices(cfg, split), {}
            for name, shape in mla_shapes(cfg).items():
                t = self._ones(shape[0]) if name.endswith("layernorm") else self._randn(*shape)
                if name in cuts:
                    dim, lo, hi = cuts[name]
                    t = t[lo:hi] if dim == 0 else t[:, lo:hi]
                w[name] = t.contiguous()
            return w
        q = slice(split.q_start * D, (split.q_start + split.num_q) * D)
        kv = slice(split.kv_start * D, (split.kv_start + split.num_kv) * D)
        w = {
            "q_proj": self._randn(cfg.num_heads * D, H)[q].contiguous(),
            "k_proj": self._randn(cfg.num_kv_heads * D, H)[kv].contiguous(),
            "v_proj": self._randn(cfg.num_kv_heads * D, H)[kv].contiguous(),
            "o_proj": self._randn(H, cfg.num_heads * D)[:, q].contiguous(),
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
        s = slice(*dense_mlp_slice(self.cfg, tp, tp_rank, F_))
        H = self.cfg.hidden_size
        return {"gate_proj": self._randn(F_, H)[s].contiguous(),
                "up_proj": self._randn(F_, H)[s].contiguous(),
                "down_proj": self._randn(H, F_)[:, s].contiguous()}

    def experts(self, layer: int, shard) -> RankMoEWeights:
        cfg = self.cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
        router = self._randn(E, H)
        # Draw per local expert in full and slice I: memory stays at one expert at a time
        # beyond the result, which matters at Qwen3-30B-A3B size on one GPU.
        gate_up, down = [], []
        for _ in range(shard.expert_start):  # advance the generator identically on every rank
            self._randn(2 * I, H), self._randn(H, I)
        for _ in range(shard.num_local_experts):
            gate_up.append(cut_gate_up(self._randn(2 * I, H), shard, dim=0))
            down.append(self._randn(H, I)[:, shard.i_slice])
        for _ in range(shard.expert_end, E):
            self._randn(2 * I, H), self._randn(H, I)
        out = RankMoEWeights(router, torch.stack(gate_up).contiguous(),
                             torch.stack(down).contiguous(), "random")
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
