"""Build a randomly initialised torchvision or timm model by name (no weights are downloaded)."""
from __future__ import annotations

import torch.nn as nn

from .errors import ConfigError


def create_model(name: str, **kwargs) -> nn.Module:
    """torchvision name first (resnet50, mobilenet_v3_large, ...), then timm (vit_small_patch16_224, ...)."""
    import torchvision
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        import timm
    except ImportError:  # pragma: no cover
        timm = None
    if timm is not None and timm.is_model(name):
        return timm.create_model(name, pretrained=False, **kwargs)
    raise ConfigError(f"unknown model '{name}': not a torchvision model name nor a timm model name "
                      f"(see torchvision.models.list_models() and timm.list_models())")


def default_input_shape(model: nn.Module, name: str = "") -> tuple:
    """(1, C, H, W) the model expects: timm's pretrained_cfg when present, else 1x3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *shape) if shape else (1, 3, 224, 224)
