"""Where a model's rank-local weights come from: a checkpoint directory, or random numbers.

Legend: V vocab, H hidden, E experts, E_l local experts, I_l local expert intermediate,
F_l local dense intermediate, D head dim.

The model builder asks a *weight source* for one piece at a time, already cut to this rank:
:class:`CheckpointWeights` reads those slices from safetensors (``get_slice``, nothing more);
:class:`RandomWeights` draws them from a seeded generator, for benchmarks at the shape of a
model too big to download (full tensors are drawn and then sliced, so every rank agrees on the
replicated ones, such as the router).
"""

from __future__ import annotations

import torch

from moelora_dist.models.attention import HeadSplit, load_attention_weights
from moelora_dist.models.checkpoint import CheckpointReader
from moelora_dist.models.config import ModelConfig
from moelora_dist.models.mlp import load_dense_mlp_weights, load_expert_weights


class CheckpointWeights:
    """Rank-local slices read from a Hugging Face model directory."""

    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype):
        self.reader = CheckpointReader(model_dir)
        self.cfg, self.dtype = cfg, dtype

    def close(self) -> None:
        self.reader.close()

    def embed(self) -> torch.Tensor:
        """``[V, H]`` token embeddings (replicated)."""
        cfg = self.cfg
        return self.reader.get("model.embed_tokens.weight", dtype=self.dtype,
                               expect_shape=(cfg.vocab_size, cfg.hidden_size))

    def lm_head(self) -> torch.Tensor:
        """``[V, H]`` output projection (replicated); the embeddings when they are tied."""
        if self.cfg.tie_word_embeddings or not self.reader.has("lm_head.weight"):
            if not self.cfg.tie_word_embeddings:
                raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is "
                                 "false in config.json")
            return self.embed()
        return self.reader.get("lm_head.weight", dtype=self.dtype,
                               expect_shape=(self.cfg.vocab_size, self.cfg.hidden_size))

    def norm(self, name: str) -> torch.Tensor:
        """``[H]`` RMSNorm weight: ``model.norm`` or ``model.layers.{l}.<ln name>``."""
        return self.reader.get(f"{name}.weight", dtype=self.dtype,
                               expect_shape=(self.cfg.hidden_size,))

    def attention(self, layer: int, split: HeadSplit) -> dict[str, torch.Tensor]:
        return load_attention_weights(self.reader, self.cfg, layer, split, self.dtype)

    def dense_mlp(self, layer: int, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
        return load_dense_mlp_weights(self.reader, self.cfg, layer, tp, tp_rank, self.dtype)

    def experts(self, layer: int, shard):
        """``router_EH [E, H]``, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]``."""
        return load_expert_weights(self.reader, self.cfg, layer, shard, self.dtype)


class RandomWeights:
    """Seeded ``N(0, std^2)`` weights (norms are ones) cut to this rank, drawn on ``device``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0,
                 std: float = 0.02):
        self.cfg, self.dtype, self.device, self.std = cfg, dtype, torch.device(device), std
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def close(self) -> None:
        pass

    def _randn(self, *shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * self.std).to(self.dtype)

    def embed(self) -> torch.Tensor:
        return self._randn(self.cfg.vocab_size, self.cfg.hidden_size)

    def lm_head(self) -> torch.Tensor:
        return self._randn(self.cfg.vocab_size, self.cfg.hidden_size)

    def norm(self, name: str) -> torch.Tensor:
        return torch.ones(self.cfg.hidden_size, dtype=self.dtype, device=self.device)

    def attention(self, layer: int, split: HeadSplit) -> dict[str, torch.Tensor]:
        cfg, D, H = self.cfg, self.cfg.head_dim, self.cfg.hidden_size
        q = slice(split.q_start * D, (split.q_start + split.num_q) * D)
        kv = slice(split.kv_start * D, (split.kv_start + split.num_kv) * D)
        w = {
            "q_proj": self._randn(cfg.num_heads * D, H)[q].contiguous(),
            "k_proj": self._randn(cfg.num_kv_heads * D, H)[kv].contiguous(),
            "v_proj": self._randn(cfg.num_kv_heads * D, H)[kv].contiguous(),
            "o_proj": self._randn(H, cfg.num_heads * D)[:, q].contiguous(),
        }
        ones = lambda n: torch.ones(n, dtype=self.dtype, device=self.device)  # noqa: E731
        if cfg.qk_norm == "head":
            w["q_norm"], w["k_norm"] = ones(D), ones(D)
        elif cfg.qk_norm == "full":
            w["q_norm"], w["k_norm"] = ones(split.num_q * D), ones(split.num_kv * D)
        return w

    def dense_mlp(self, layer: int, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
        from moelora_dist.models.mlp import dense_mlp_slice

        s = slice(*dense_mlp_slice(self.cfg, tp, tp_rank))
        F_, H = self.cfg.dense_intermediate, self.cfg.hidden_size
        return {"gate_proj": self._randn(F_, H)[s].contiguous(),
                "up_proj": self._randn(F_, H)[s].contiguous(),
                "down_proj": self._randn(H, F_)[:, s].contiguous()}

    def experts(self, layer: int, shard):
        cfg = self.cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
        router = self._randn(E, H)
        e, i = slice(shard.expert_start, shard.expert_end), slice(shard.i_start, shard.i_end)
        # Draw per local expert in full and slice I: memory stays at one expert at a time
        # beyond the result, which matters at Qwen3-30B-A3B size on one GPU.
        gate_up, down = [], []
        for _ in range(shard.expert_start):  # advance the generator identically on every rank
            self._randn(2 * I, H), self._randn(H, I)
        for _ in range(e.stop - e.start):
            gu = self._randn(2 * I, H)
            gate_up.append(torch.cat([gu[i], gu[I + i.start:I + i.stop]], dim=0))
            down.append(self._randn(H, I)[:, i])
        for _ in range(e.stop, E):
            self._randn(2 * I, H), self._randn(H, I)
        return router, torch.stack(gate_up).contiguous(), torch.stack(down).contiguous()
