"""Width-explicit multi-task models: configs, encoder, heads, registry, weights and complexity.

Typical use::

    from training.models import create_model, build_model
    model = create_model(encoder="tiny", tasks=tasks)            # registry defaults
    same = build_model(ModelConfig.from_dict(model.config.to_dict()))  # rebuild from a config
"""

from training._lazy import lazy_exports

_EXPORTS = {
    "BasicBlock": ".encoder",
    "Bottleneck": ".encoder",
    "ConfigError": ".config",
    "ConvBNAct": ".layers",
    "EncoderConfig": ".config",
    "HeadConfig": ".config",
    "ModelConfig": ".config",
    "MultiTaskModel": ".multitask",
    "PretrainedMismatch": ".pretrained",
    "ResNetEncoder": ".encoder",
    "StageConfig": ".config",
    "available_encoders": ".registry",
    "available_heads": ".heads",
    "build_head": ".heads",
    "build_model": ".registry",
    "count_macs": ".complexity",
    "count_parameters": ".complexity",
    "create_model": ".registry",
    "encoder_config": ".registry",
    "load_torchvision_resnet": ".pretrained",
    "macs_by_module": ".complexity",
    "macs_by_prefix": ".complexity",
    "model_config": ".registry",
    "register_encoder": ".registry",
    "register_head": ".heads",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
