"""Configuration of the OpenAI-Five-like example policy: every field list, vocabulary and width.

Two presets exist. ``small`` is for tests (about 11k parameters). ``full`` has the scale
of the OpenAI Five policy ("Dota 2 with Large Scale Deep Reinforcement Learning", Berner et
al., arXiv 1912.06680), whose core is a 4096-unit LSTM: about 158.5M parameters and at
least 16,000 observation values per sample. Surgery tests build variants by overriding
single keys, for example a longer ``unit_fields`` list or a wider ``lstm_width``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

RESERVED_HEADS = ("target_unit", "value")


class FiveConfigError(ValueError):
    """An invalid configuration of the Five-like policy. The message names the key."""


@dataclass(frozen=True)
class FiveConfig:
    """Fields, vocabularies, action lists and widths of the Five-like policy."""

    # Units: an entity array of up to ``max_units`` units, each with ``unit_fields`` and a
    # ``unit_types`` category, encoded by one shared MLP and max-pooled over present units.
    unit_fields: tuple[str, ...]
    max_units: int
    unit_types: tuple[str, ...]
    unit_type_width: int
    unit_width: int
    # Heroes: an entity array that is always full, encoded by one shared MLP and mean-pooled.
    hero_fields: tuple[str, ...]
    max_heroes: int
    hero_width: int
    # Inventory: ``item_slots`` slots that share the ``items`` vocabulary, summed by an
    # EmbeddingBag, so the slot order does not matter.
    items: tuple[str, ...]
    item_slots: int
    item_width: int
    # Global scalars without an entity axis.
    global_fields: tuple[str, ...]
    global_width: int
    # Trunk, recurrent core and the key width of the target-unit pointer head.
    trunk_width: int
    lstm_width: int
    target_width: int
    # One linear head per entry, with one output field per name.
    action_heads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _numbered(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(start, stop))


def _padded(names: tuple[str, ...], prefix: str, total: int) -> tuple[str, ...]:
    """Extend ``names`` with generated names up to ``total`` entries."""
    return names + _numbered(prefix, len(names), total)


def _bins(count: int) -> tuple[str, ...]:
    """Name ``count`` movement bins by their signed offset from the centre: -2 ... +2."""
    half = count // 2
    return tuple(f"{offset:+d}" if offset else "0" for offset in range(-half, count - half))


_UNIT_FIELDS = (
    "x", "y", "health", "max_health", "mana", "attack_damage", "armor", "is_enemy",
)  # fmt: skip
_UNIT_TYPES = ("hero", "creep", "tower", "courier", "ward")
_HERO_FIELDS = ("level", "gold", "experience", "health_fraction")
_ITEMS = ("empty", "tango", "healing_salve", "clarity", "boots", "iron_branch")
_GLOBAL_FIELDS = ("game_time", "is_day", "roshan_alive")
_ACTIONS = ("noop", "move", "attack", "use_item", "cast")

SMALL = FiveConfig(
    unit_fields=_UNIT_FIELDS,
    max_units=6,
    unit_types=_UNIT_TYPES,
    unit_type_width=4,
    unit_width=16,
    hero_fields=_HERO_FIELDS,
    max_heroes=2,
    hero_width=8,
    items=_ITEMS,
    item_slots=3,
    item_width=4,
    global_fields=_GLOBAL_FIELDS,
    global_width=8,
    trunk_width=32,
    lstm_width=32,
    target_width=8,
    action_heads={"action_type": _ACTIONS, "move_x": _bins(5), "move_y": _bins(5)},
)

FULL = FiveConfig(
    unit_fields=_padded(_UNIT_FIELDS, "unit_feature_", 80),
    max_units=189,
    unit_types=_padded(_UNIT_TYPES, "unit_type_", 256),
    unit_type_width=64,
    unit_width=2048,
    hero_fields=_padded(_HERO_FIELDS, "hero_feature_", 64),
    max_heroes=10,
    hero_width=512,
    items=_padded(_ITEMS, "item_", 512),
    item_slots=16,
    item_width=256,
    global_fields=_padded(_GLOBAL_FIELDS, "global_feature_", 64),
    global_width=1024,
    trunk_width=4096,
    lstm_width=4096,
    target_width=512,
    action_heads={
        "action_type": _padded(_ACTIONS, "action_", 30),
        "move_x": _bins(9),
        "move_y": _bins(9),
        "delay": _numbered("frame_", 0, 4),
    },
)

PRESETS = {"small": SMALL, "full": FULL}

_NAME_LISTS = ("unit_fields", "unit_types", "hero_fields", "items", "global_fields")
_SIZES = (
    "max_units", "unit_type_width", "unit_width", "max_heroes", "hero_width", "item_slots",
    "item_width", "global_width", "trunk_width", "lstm_width", "target_width",
)  # fmt: skip


def make_config(size: str = "small", **overrides: Any) -> FiveConfig:
    """Start from the ``size`` preset and replace the keys given in ``overrides``."""
    if size not in PRESETS:
        raise FiveConfigError(f"size {size!r} is invalid; expected one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(FiveConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise FiveConfigError(
            f"unknown config keys {unknown}; the Five-like policy takes 'size' and {sorted(known)}"
        )
    values = {key: _normalise(key, value) for key, value in overrides.items()}
    config = dataclasses.replace(PRESETS[size], **values)
    _validate(config)
    return config


def _normalise(key: str, value: Any) -> Any:
    if key in _NAME_LISTS:
        return _name_list(key, value)
    if key == "action_heads":
        if not isinstance(value, Mapping):
            raise FiveConfigError(
                f"config 'action_heads' must map head names to lists of field names, "
                f"got {type(value).__name__}"
            )
        return {str(name): _name_list(f"action_heads.{name}", f) for name, f in value.items()}
    return value


def _name_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise FiveConfigError(f"config {key!r} must be a list of names, got {value!r}")
    names = tuple(str(v) for v in value)
    if not names:
        raise FiveConfigError(f"config {key!r} is empty; it needs at least one name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FiveConfigError(f"config {key!r} names {duplicates} more than once")
    return names


def _validate(config: FiveConfig) -> None:
    for key in _SIZES:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FiveConfigError(f"config {key!r} must be a positive integer, got {value!r}")
    if not config.action_heads:
        raise FiveConfigError("config 'action_heads' is empty; name at least one action head")
    clashes = sorted(set(config.action_heads) & set(RESERVED_HEADS))
    if clashes:
        raise FiveConfigError(
            f"action heads {clashes} clash with the built-in outputs {list(RESERVED_HEADS)}; "
            "rename them"
        )
