"""Width-explicit multi-task models: configs, encoder, heads, registry, weights and complexity.

Typical use::

    from training.models import create_model, build_model
    model = create_model(encoder="tiny", tasks=tasks)            # registry defaults
    same = build_model(ModelConfig.from_dict(model.config.to_dict()))  # rebuild from a config
"""

from training._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".complexity": ("count_macs", "count_parameters", "macs_by_module", "macs_by_prefix",),
    ".config": ("ConfigError", "EncoderConfig", "HeadConfig", "ModelConfig", "StageConfig",),
    ".encoder": ("BasicBlock", "Bottleneck", "ResNetEncoder",),
    ".heads": ("available_heads", "build_head", "register_head",),
    ".layers": ("ConvBNAct",),
    ".multitask": ("MultiTaskModel",),
    ".pretrained": ("PretrainedMismatch", "load_torchvision_resnet",),
    ".registry": (
        "available_encoders", "build_model", "create_model", "encoder_config", "model_config",
        "register_encoder",
    ),
})
