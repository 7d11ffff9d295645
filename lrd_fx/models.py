"""Build a randomly initialised torchvision or timm model by name (no weights are downloaded)."""
from __future__ import annotations

import torch
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


# checkpoint dicts that hold the state_dict under one of these keys (training scripts' conventions)
_NESTED = ("state_dict", "model_state_dict", "model", "module")
# key prefixes that wrappers add to every name: DistributedDataParallel, torch.compile
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str) -> dict:
    """The tensors of a weights file, without running code: a safetensors file (by its suffix or its header)
    through safetensors; anything else through torch.load(weights_only=True), which refuses pickled objects other than tensors and
    plain containers. A checkpoint dict holding the state_dict under "state_dict", "model_state_dict",
    "model" or "module" is unwrapped, and a prefix every key shares ("module." from DDP, "_orig_mod."
    from torch.compile) is removed."""
    import os

    from .errors import LoadError
    from .serialize import is_state_dict
    if not os.path.isfile(path):
        raise LoadError(f"--weights {path!r}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        # safetensors: an 8-byte little-endian header length, then the JSON header
        if path.endswith(".safetensors") or head[8:9] == b"{":
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure: say which file and what to do
        raise LoadError(
            f"--weights {path!r} cannot be read as a safetensors file or a tensors-only torch checkpoint "
            f"({type(e).__name__}: {str(e)[:300]}). Pickled objects other than tensors are refused, since "
            f"unpickling them runs code: save the weights with torch.save(model.state_dict(), path) or "
            f"safetensors.torch.save_file(model.state_dict(), path)") from e
    for _ in range(2):
        if isinstance(sd, dict) and not is_state_dict(sd):
            inner = [sd[k] for k in _NESTED if is_state_dict(sd.get(k))]
            if inner:
                sd = inner[0]
    if not is_state_dict(sd) or not sd:
        what = (f"a dict with keys {sorted(map(str, sd))[:6]}" if isinstance(sd, dict) else type(sd).__name__)
        raise LoadError(f"--weights {path!r} holds {what}, not a state_dict (names -> tensors), nor one under "
                        f"{', '.join(repr(k) for k in _NESTED)}")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str, name: str = "") -> nn.Module:
    """Load the weights file at `path` (read_state_dict) into `model`, every parameter and buffer (another
    float precision is cast; another kind of number, or a sparse, meta or quantized tensor, is refused); a
    LoadError names the missing, unexpected and mis-shaped entries (a classifier of another size: pass the
    number of classes the file has)."""
    from .errors import LoadError
    from .serialize import number_kinds_differ
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + "; ".join(f"{k} is {list(a)} in the file, {list(b)} in the model"
                                                      for k, a, b in shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing from the file: {', '.join(missing[:4])}"
                         + (", …" if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model: {', '.join(unexpected[:4])}"
                         + (", …" if len(unexpected) > 4 else ""))
        hint = ""
        # only the first dimension differs, the same in every mis-shaped entry: a classifier of another size
        head = {a[0] for _, a, b in shapes if len(a) in (1, 2) and len(a) == len(b) and a[1:] == b[1:]}
        if shapes and len(head) == 1 and all(len(a) in (1, 2) and a[1:] == b[1:] for _, a, b in shapes):
            hint = f" If the file's classifier has {head.pop()} classes, pass --num-classes with that number."
        raise LoadError(f"--weights {path!r} does not fit {name or type(model).__name__}: {' | '.join(parts)}."
                        f"{hint}")
    for k, t in own.items():
        got = sd[k]
        if got.layout != torch.strided or got.is_meta or got.is_quantized:
            kind = "meta" if got.is_meta else "quantized" if got.is_quantized else "sparse"
            raise LoadError(f"--weights {path!r}: '{k}' is a {kind} tensor, not a dense one with values; save "
                            f"the float model's state_dict")
        if number_kinds_differ(got.dtype, t.dtype):
            raise LoadError(f"--weights {path!r}: '{k}' is {got.dtype} in the file but {t.dtype} in the model")
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses, said with the file's name
        raise LoadError(f"--weights {path!r} does not load into {name or type(model).__name__}: "
                        f"{type(e).__name__}: {str(e)[:300]}") from e
    return model
