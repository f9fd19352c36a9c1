"""Saving and loading our architectures as safetensors: weights plus the config that rebuilds them.

The file's metadata holds ``format`` (``ronan_fast.model/1``), ``architecture`` (a name in
:data:`ronan_fast.models.ARCHITECTURES`), ``config`` (JSON of the constructor's keyword
arguments) and optionally ``info`` (JSON, e.g. how the weights were trained). Loading never
unpickles: it parses the metadata, builds the class from the registry and loads the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ronan_fast import _atomic

FORMAT = "ronan_fast.model/1"


def _registry() -> dict[str, type]:
    from ronan_fast.models import ARCHITECTURES

    return ARCHITECTURES


def architecture_name(model: nn.Module) -> str:
    for name, cls in _registry().items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a registered architecture: {sorted(_registry())}")


def save_model(model: nn.Module, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s tensors and config to ``path`` (safetensors), atomically. Returns the path."""
    from safetensors.torch import save_file

    name = architecture_name(model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{name} has no config dict; cannot be rebuilt from a file")
    metadata = {"format": FORMAT, "architecture": name, "config": json.dumps(config, sort_keys=True)}
    if info is not None:
        metadata["info"] = json.dumps(info, sort_keys=True, default=str)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    with _atomic.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a model file: architecture, config (dict) and info (dict or None)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if "architecture" not in meta or "config" not in meta:
        raise ValueError(f"{path}: metadata lacks 'architecture' or 'config'")
    return {
        "architecture": meta["architecture"],
        "config": json.loads(meta["config"]),
        "info": json.loads(meta["info"]) if "info" in meta else None,
    }


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", eval: bool = True) -> nn.Module:
    """Rebuild the model stored at ``path`` from its metadata; in eval mode unless ``eval=False``."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    registry = _registry()
    name = meta["architecture"]
    if name not in registry:
        raise ValueError(f"{path}: unknown architecture {name!r}; known: {sorted(registry)}")
    model = registry[name](**meta["config"])
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {name}({meta['config']}): missing {missing}, unexpected {unexpected}")
    model.to(device)
    model.info = meta["info"]
    return model.eval() if eval else model.train()
