"""Where a model's rank-local weights come from: a checkpoint directory, or random numbers.

Legend: V vocab, H hidden, E experts, E_l local experts, I_l local expert intermediate,
F_l local dense intermediate, D head dim.

The model builder asks a *weight source* for one piece at a time, already cut to this rank:
:class:`CheckpointWeights` reads those slices from safetensors (``get_slice``, nothing more);
:class:`~.random_weights.RandomWeights` draws them from a seeded generator, for benchmarks at
the shape of a model too big to download (:class:`~.random_weights.RandomFP8Weights`: the same
values as their FP8 checkpoint loads, through this loader's FP8 reads).

Keys a checkpoint may hold that the model does not place: ``rotary_emb.inv_freq`` buffers,
and the multi-token-prediction layers DeepSeek-V3 / GLM-4.5 publish after the last decoder
layer (``model.layers.{L}..{L + num_nextn_predict_layers - 1}.*``; MTP is not served): both are
skipped, the MTP ones with a log line. Any other unplaced tensor refuses the checkpoint.
"""

from __future__ import annotations

import logging
import re

import torch

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.files.paths import kind_of
from moelora_dist.files.safetensors_io import SafetensorsReader
from moelora_dist.models.attention import HeadSplit, load_attention_weights
from moelora_dist.models.fp8_weights import read_linear
from moelora_dist.models.mla import load_mla_weights
from moelora_dist.models.mlp import load_dense_mlp_weights, load_expert_weights
from moelora_dist.models.moe_weights import RankMoEWeights

log = logging.getLogger(__name__)

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
        mtp = [k for k in left if self.is_mtp_key(k)]
        if mtp:
            L, n = self.cfg.num_layers, self.cfg.mtp_layers
            log.info("checkpoint %s: %d tensor(s) of the %d multi-token-prediction layer(s) "
                     "model.layers.%s.* ignored (MTP is not served)", self.reader.path,
                     len(mtp), n, L if n == 1 else f"{{{L}..{L + n - 1}}}")
            left = [k for k in left if k not in set(mtp)]
        if self.cfg.tie_word_embeddings and "lm_head.weight" in left:
            left.remove("lm_head.weight")  # transformers ties it to the embeddings as well
        if left:
            raise ModelConfigError(
                f"checkpoint {self.reader.path} holds {len(left)} tensor(s) this model does not "
                f"place: {left[:4]}{' ...' if len(left) > 4 else ''}; they would be ignored, "
                "so the checkpoint is refused (is it quantized, or of another architecture?)")

    def is_mtp_key(self, key: str) -> bool:
        """A tensor of the MTP layers after the last decoder layer (DeepSeek-V3, GLM-4.5)."""
        m = re.match(r"model\.layers\.(\d+)\.", key)
        L = self.cfg.num_layers
        return bool(m) and L <= int(m[1]) < L + self.cfg.mtp_layers

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
        """This rank's heads of one attention layer (GQA, or MLA for DeepSeek-V3)."""
        if self.cfg.attention == "mla":
            return load_mla_weights(self.reader, self.cfg, layer, split, self.dtype)
        return load_attention_weights(self.reader, self.cfg, layer, split, self.dtype)

    def dense_mlp(self, layer: int, tp: int, tp_rank: int, module: str = "mlp",
                  intermediate: int | None = None) -> dict[str, torch.Tensor]:
        """The dense MLP of a dense layer, or (``module="mlp.shared_experts"``) the shared
        experts of a MoE layer."""
        return load_dense_mlp_weights(self.reader, self.cfg, layer, tp, tp_rank, self.dtype,
                                      module, intermediate)

    def experts(self, layer: int, shard) -> RankMoEWeights:
        """Router, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]`` and the family's
        biases (:class:`~moelora_dist.models.moe_weights.RankMoEWeights`)."""
        return load_expert_weights(self.reader, self.cfg, layer, shard, self.dtype)


from moelora_dist.models.random_weights import RandomWeights  # noqa: E402,F401  (re-export)


