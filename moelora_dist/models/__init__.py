"""Hugging Face MoE checkpoints (Qwen3-MoE, Mixtral, OLMoE) served with many LoRA adapters on
any (tp, ep) layout; see docs/models.md.

    from moelora_dist.models import ModelRunner, Request
    runner = ModelRunner.from_pretrained(model_dir, groups, dtype=torch.bfloat16)
"""

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.models.requests import Request, RequestError
from moelora_dist.models.runner import Generation, ModelRunner

__all__ = ["Generation", "ModelConfig", "ModelConfigError", "ModelRunner", "Request",
           "RequestError"]
