"""Sweeps over sampler settings: from a YAML spec to the list of points to evaluate.

A sweep is a list of entries; each entry is one sampler and the settings it takes::

    - sampler: mixed                       # ω_s ∈ [0, 7], ω_c = 7 − ω_s (paired lists)
      zip: {guidance_superclass: [0, 3.5, 7], guidance_concept: [7, 3.5, 0]}
    - sampler: switching                   # t_sw list (cartesian product)
      settings: {guidance: 7}
      grid: {t_sw: [1, 3, 5, 7, 10, 20, 30, 40]}
    - sampler: multistage                  # one curve per t_sw: name the curves
      name: multistage t_sw=10
      settings: {t_sw: 10}
      zip: {guidance_superclass: [1, 3, 5], guidance_concept: [6, 4, 2]}
    - sampler: photoswap                   # explicit points
      list: [{t_sf: 5, t_cm: 15, t_sm: 20}, {t_sf: 10, t_cm: 20, t_sm: 30}]

Every point of an entry is ``defaults ⊕ settings ⊕ (one grid combination) ⊕ (one zip
row) ⊕ (one list item)``. Each point's sampler is built (so validated) when the sweep is
expanded, before any sampling. A point's *label* names only what the entry varies; its
*curve* is the entry's ``name`` (default: the sampler name).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from samplers import build_sampler

ENTRY_KEYS = {"sampler", "name", "settings", "grid", "zip", "list"}


@dataclass(frozen=True)
class SweepPoint:
    sampler: str
    settings_json: str  # the sampler's full resolved settings, sorted JSON (part of the result key)
    label: str  # the varied settings, "t_sw=7"
    curve: str  # the Pareto curve it belongs to

    @property
    def settings(self) -> dict:
        return json.loads(self.settings_json)

    def build(self):
        return build_sampler(self.sampler, **self.settings)


def _label(values: dict) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "default"


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def expand_entry(entry: dict, defaults: dict | None = None) -> list[SweepPoint]:
    """All points of one sweep entry, in order, each validated by building its sampler."""
    if not isinstance(entry, dict) or "sampler" not in entry:
        raise ValueError(f"A sweep entry is a mapping with a 'sampler' key, e.g. {{sampler: mixed}}; got {entry!r}.")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise ValueError(f"Sweep entry for {entry['sampler']!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}.")
    name = str(entry["sampler"])
    fixed = {**(defaults or {}), **(entry.get("settings") or {})}
    grid = entry.get("grid") or {}
    zipped = entry.get("zip") or {}
    items = entry.get("list") or [{}]
    for kind, spec in (("grid", grid), ("zip", zipped)):
        bad = [k for k, v in spec.items() if not isinstance(v, list) or not v]
        if bad:
            raise ValueError(f"Sweep entry {name!r}: {kind} values of {bad} must be non-empty lists.")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ValueError(f"Sweep entry {name!r}: zip lists must have equal lengths, got {({k: len(v) for k, v in zipped.items()})}.")
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    grid_rows = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    points = []
    for g in grid_rows:
        for z in zip_rows:
            for item in items:
                varied = {**g, **z, **item}
                sampler = build_sampler(name, **{**fixed, **varied})  # raises ValueError on bad settings
                settings = json.dumps(sampler.settings(), sort_keys=True)
                points.append(SweepPoint(name, settings, _label(varied), str(entry.get("name") or name)))
    return points


def expand_sweep(entries: list[dict] | dict, defaults: dict | None = None) -> list[SweepPoint]:
    """All points of a sweep, duplicates (same sampler and resolved settings) removed."""
    if isinstance(entries, dict):
        entries = [entries]
    if not entries:
        raise ValueError("The sweep is empty: give at least one entry, e.g. [{sampler: concept}].")
    seen, points = set(), []
    for entry in entries:
        for p in expand_entry(entry, defaults):
            if (p.sampler, p.settings_json) not in seen:
                seen.add((p.sampler, p.settings_json))
                points.append(p)
    return points
