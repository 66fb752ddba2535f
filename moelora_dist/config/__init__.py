"""A model's ``config.json``, parsed once (:mod:`.model`)."""

from moelora_dist.config.model import SUPPORTED_ARCHS, ModelConfig, ModelConfigError

__all__ = ["SUPPORTED_ARCHS", "ModelConfig", "ModelConfigError"]
