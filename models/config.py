"""Model configs: frozen dataclasses, overridable from YAML/JSON files and key=value pairs.

Never `eval`s a string: overrides are parsed as YAML scalars/lists and type-checked against the
dataclass defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import yaml

CONFIG_FILE = "model_config.json"


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """What every model needs to know about its inputs.

    The Trainer fills `domains` and the history lengths from the ingestion's feature contract.

    Attributes:
      domains: the domain vocabulary, in index order.
      history_length: length of the mixed-domain history.
      domain_history_length: length of each per-domain history.
      item_buckets: rows of the item tables; index 0 is padding. Without `item_vocabulary`, the
        number of hash buckets for item ids; with it, n + 1 vocabulary rows then the buckets that
        ids outside the vocabulary are hashed into.
      user_buckets: number of hash buckets for user ids; index 0 is padding.
      item_vocabulary: item ids looked up rather than hashed (the k-th -> row k + 1), so that no
        two of them share a row; empty: every item id is hashed. The Trainer fills it from the
        train split with `--set item_buckets=vocabulary`.
    """

    domains: tuple = ("a", "b")
    history_length: int = 20
    domain_history_length: int = 10
    item_buckets: int = 1 << 15
    user_buckets: int = 1 << 15
    item_vocabulary: tuple = dataclasses.field(default=(), repr=False)  # can be long

    def __post_init__(self):
        if self.item_vocabulary and self.item_buckets < len(self.item_vocabulary) + 2:
            raise ValueError(f"`item_buckets` must be >= len(item_vocabulary) + 2 = {len(self.item_vocabulary) + 2} "
                             f"(padding, the vocabulary, at least one bucket for other ids). "
                             f"Received: item_buckets={self.item_buckets}")
        if len(set(self.item_vocabulary)) != len(self.item_vocabulary):
            raise ValueError("`item_vocabulary` must not repeat an id")

    @property
    def num_domains(self) -> int:
        return len(self.domains)


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif dataclasses.is_dataclass(default):
        if isinstance(value, Mapping):
            return override(default, value)
    raise ValueError(f"config field `{name}` expects {type(default).__name__}. Received: {name}={value!r}")


def override(config, values: Mapping[str, Any]):
    """Returns a copy of `config` with `values` applied; unknown keys raise ValueError."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for name, value in values.items():
        if name not in fields:
            raise ValueError(
                f"unknown config field `{name}` for {type(config).__name__}; known: {sorted(fields)}"
            )
        changes[name] = _coerce(name, value, getattr(config, name))
    return dataclasses.replace(config, **changes)


def parse_assignments(assignments: Sequence[str]) -> dict:
    """['a=1', 'b.c=[2,3]'] -> {'a': 1, 'b': {'c': [2, 3]}} (values parsed as YAML)."""
    result: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        target = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(text)
    return result


def load_overrides(path: Optional[str]) -> dict:
    """Reads a YAML or JSON mapping of overrides (JSON is YAML)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return dict(values)


def to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save(config, model_name: str, directory: str) -> str:
    """Writes the resolved config next to a trained model; returns the path."""
    import tensorflow as tf  # gfile, so remote directories work

    path = os.path.join(directory, CONFIG_FILE)
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps({"model": model_name, "config": to_dict(config)}, indent=2, sort_keys=True))
    return path
