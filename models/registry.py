"""Model registry: `build(name, config)` and the config class of every model."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from models import config as config_lib

_REGISTRY: dict = {}


def register(name: str, config_class: type):
    """Class decorator: registers a model class under `name` with its config dataclass."""

    def wrap(model_class):
        if name in _REGISTRY:
            raise ValueError(f"model `{name}` is registered twice")
        _REGISTRY[name] = (model_class, config_class)
        return model_class

    return wrap


def names() -> list:
    return sorted(_REGISTRY)


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model `{name}`; known models: {', '.join(names())}")
    return _REGISTRY[name]


def model_class(name: str) -> type:
    return _entry(name)[0]


def default_config(name: str):
    return _entry(name)[1]()


def resolve_config(name: str, overrides: Optional[Mapping[str, Any]] = None):
    """The model's default config with `overrides` applied."""
    return config_lib.override(default_config(name), overrides or {})


def build(name: str, config=None):
    """Builds model `name`; `config` is its config dataclass, a mapping of overrides, or None."""
    model_class, config_class = _entry(name)
    if config is None or isinstance(config, Mapping):
        config = resolve_config(name, config)
    if not isinstance(config, config_class):
        raise ValueError(f"model `{name}` expects a {config_class.__name__}, got {type(config).__name__}")
    return model_class(config)
