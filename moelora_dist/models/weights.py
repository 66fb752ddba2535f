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

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.files.paths import kind_of
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.models.attention import HeadSplit, load_attention_weights
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.mlp import dense_mlp_slice, load_dense_mlp_weights, load_expert_weights
from moelora_dist.parallel.sharding import cut_gate_up

# Checkpoint keys that hold no weight of the model (buffers transformers recomputes).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointWeights:
    """Rank-local slices read from a Hugging Face model directory."""

    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype):
        if kind_of(model_dir) != "dir":
            raise ModelConfigError(f"--model {model_dir}: not a directory; give a Hugging Face "
                                   "model directory (config.json + *.safetensors)")
        self.reader = SafetensorsReader(model_dir, what="model directory")
        self.cfg, self.dtype = cfg, dtype

    def check_all_placed(self) -> None:
        """Refuse a checkpoint holding tensors the model did not place (an unknown tensor, a
        quantization scale such as ``*_scale_inv``): serving without them would silently
        change the model. Call after every weight has been read."""
        left = self.reader.unread([lambda k: k.endswith(IGNORED_KEY_SUFFIXES)])
        if self.cfg.tie_word_embeddings and "lm_head.weight" in left:
            left.remove("lm_head.weight")  # transformers ties it to the embeddings as well
        if left:
            raise ModelConfigError(
                f"checkpoint {self.reader.path} holds {len(left)} tensor(s) this model does not "
                f"place: {left[:4]}{' ...' if len(left) > 4 else ''}; they would be ignored, "
                "so the checkpoint is refused (is it quantized, or of another architecture?)")

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
        return read_linear(self.reader, self.cfg, "lm_head", dtype=self.dtype,
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

    def check_all_placed(self) -> None:
        pass

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
        s = slice(*dense_mlp_slice(self.cfg, tp, tp_rank))
        F_, H = self.cfg.dense_intermediate, self.cfg.hidden_size
        return {"gate_proj": self._randn(F_, H)[s].contiguous(),
                "up_proj": self._randn(F_, H)[s].contiguous(),
                "down_proj": self._randn(H, F_)[:, s].contiguous()}

    def experts(self, layer: int, shard):
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
        return router, torch.stack(gate_up).contiguous(), torch.stack(down).contiguous()
