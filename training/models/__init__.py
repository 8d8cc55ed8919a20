"""Width-explicit multi-task models: configs, encoder, heads, registry, weights and complexity.

Typical use::

    from training.models import create_model, build_model
    model = create_model(encoder="tiny", tasks=tasks)            # registry defaults
    same = build_model(ModelConfig.from_dict(model.config.to_dict()))  # rebuild from a config
"""

from training.models.complexity import count_macs, count_parameters, macs_by_module, macs_by_prefix
from training.models.config import ConfigError, EncoderConfig, HeadConfig, ModelConfig, StageConfig
from training.models.encoder import BasicBlock, Bottleneck, ResNetEncoder
from training.models.heads import available_heads, build_head, register_head
from training.models.layers import ConvBNAct
from training.models.multitask import MultiTaskModel
from training.models.pretrained import PretrainedMismatch, load_torchvision_resnet
from training.models.registry import (
    available_encoders,
    build_model,
    create_model,
    encoder_config,
    model_config,
    register_encoder,
)

__all__ = ["BasicBlock", "Bottleneck", "ConfigError", "ConvBNAct", "EncoderConfig", "HeadConfig", "ModelConfig",
           "MultiTaskModel", "PretrainedMismatch", "ResNetEncoder", "StageConfig", "available_encoders",
           "available_heads", "build_head", "build_model", "count_macs", "count_parameters", "create_model",
           "encoder_config", "load_torchvision_resnet", "macs_by_module", "macs_by_prefix", "model_config",
           "register_encoder", "register_head"]
