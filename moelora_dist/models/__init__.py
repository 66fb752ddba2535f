"""Hugging Face MoE checkpoints (Qwen3-MoE, Mixtral, OLMoE) as one rank's model with a multi-LoRA
pool, on any (tp, ep) layout; see docs/models.md. What serves requests on it is the engine
(:mod:`moelora_dist.engine`).

    from moelora_dist.models import MoELoRAModel, ModelConfig
    model = MoELoRAModel.build(cfg, groups, CheckpointWeights(model_dir, cfg, dtype), dtype=dtype)
"""

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.models.model import MoELoRAModel

__all__ = ["ModelConfig", "ModelConfigError", "MoELoRAModel"]
