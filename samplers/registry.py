"""Sampler registry, construction by name, and the sampler YAML format.

A sampler YAML (``configs/samplers/<name>.yaml``) is flat: the ``sampler`` key names the
strategy, every other key is one of its settings::

    sampler: mixed
    num_steps: 50
    guidance_concept: 3.5
    guidance_superclass: 3.5

A new strategy is added by writing its class with ``@register``; nothing else changes.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import yaml

from samplers.base import Sampler

#: name -> Sampler subclass
SAMPLERS: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    if not cls.name or cls.name in SAMPLERS:
        raise ValueError(f"sampler class {cls.__name__} needs a unique name (got {cls.name!r})")
    SAMPLERS[cls.name] = cls
    return cls


def setting_names(name: str) -> list[str]:
    return [p for p in inspect.signature(_sampler_class(name).__init__).parameters if p != "self"]


def build_sampler(name: str, **settings: Any) -> Sampler:
    """A validated sampler; raises ValueError naming the problem and the fix."""
    cls = _sampler_class(name)
    allowed = setting_names(name)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {', '.join(unknown)}; its settings are {', '.join(allowed)}")
    return cls(**settings)


def load_sampler_config(path: str | os.PathLike) -> tuple[str, dict]:
    """(name, settings) from a sampler YAML."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or "sampler" not in config:
        raise ValueError(f"{path}: a sampler config is a mapping with a 'sampler' key, e.g. 'sampler: mixed'")
    config = dict(config)
    return str(config.pop("sampler")), config


def sampler_from_config(path: str | os.PathLike, **overrides: Any) -> Sampler:
    name, settings = load_sampler_config(path)
    return build_sampler(name, **{**settings, **overrides})


def parse_sampler_spec(spec: Any) -> tuple[str, str, dict]:
    """(label, sampler name, settings) from a sampler spec as configs give it: a name
    (``"mixed"``), a sampler YAML path, or a flat mapping ``{sampler: mixed, name: optional
    label, <settings>...}``. The label is the YAML's stem, the mapping's ``name``, else the
    sampler's name."""
    from pathlib import Path

    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith((".yaml", ".yml")):
        name, settings = load_sampler_config(spec)
        return Path(spec).stem, name, settings
    if isinstance(spec, str):
        return spec, spec, {}
    if isinstance(spec, dict) and "sampler" in spec:
        settings = {k: v for k, v in spec.items() if k not in ("sampler", "name")}
        return str(spec.get("name", spec["sampler"])), str(spec["sampler"]), settings
    raise ValueError(f"Sampler spec {spec!r}: give a name ('mixed'), a sampler YAML path, or "
                     "a mapping {sampler: mixed, name: optional log name, <settings>...}.")


def sampler_spec(sampler: Any = None, config: str | os.PathLike | None = None,
                 settings: dict | None = None) -> tuple[str, dict]:
    """(name, settings) of a command's sampler options, through :func:`parse_sampler_spec`:
    ``sampler`` (a name, a sampler YAML or a mapping), ``config`` (a sampler YAML: its name
    must agree with ``sampler``'s), then ``settings`` over both. ValueError naming the fix."""
    name, merged = None, {}
    if config:
        name, merged = load_sampler_config(config)
    if sampler:
        _, own, own_settings = parse_sampler_spec(sampler)
        if name and own != name:
            raise ValueError(f"--sampler {own} contradicts {config}, which configures '{name}'")
        name, merged = own, {**own_settings, **merged}
    if not name:
        raise ValueError("choose a sampler with --sampler NAME or --sampler_config YAML")
    return name, {**merged, **(settings or {})}


def _sampler_class(name: str) -> type[Sampler]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
