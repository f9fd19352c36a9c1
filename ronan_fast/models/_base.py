"""Shared pieces of the architectures: a config-carrying module base and argument checks."""

from __future__ import annotations

from typing import Any

from torch import nn


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ConfigModule(nn.Module):
    """An ``nn.Module`` whose constructor is fully described by the JSON-able dict ``self.config``.

    ``type(m)(**m.config)`` rebuilds an untrained twin of ``m``; with ``m.state_dict()`` it is
    ``m`` again. :func:`ronan_fast.models.save_model` stores both.
    """

    config: dict[str, Any]

    def _set_config(self, **config: Any) -> None:
        self.config = dict(config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not isinstance(v, dict))
