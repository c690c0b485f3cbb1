"""Concept sources: concept specs that name where images come from instead of a folder.

``concept_dir`` (training), evaluate.py's concept folders and the reference-guided
sampler's ``references`` take a folder, or a source spec: ``demo`` (the synthetic demo
concept) or ``<prefix>:<spec>`` such as ``miniworld:green_dotted_cube:varied:6``. A source
is a resolver registered under its prefix (``spec after the colon -> ConceptSource``). A
plugin package registers its own sources when imported (``miniworld.sources``); the
registry knows only the plugin's module name (:data:`PLUGINS`) and imports it when a spec
asks for its prefix, so nothing here imports the plugin.

Plugins may also register a caption reader (:func:`register_captions`): captions for the
views of a concept folder from its ``concept.json`` (MiniWorld: the scene of each view).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

#: prefix -> module that registers it when imported (imported lazily, by name)
PLUGINS: dict[str, str] = {"miniworld": "miniworld.sources"}


@dataclass(frozen=True)
class ConceptSource:
    folder: str  # a concept folder (images, optional masks, prompts.txt, concept.json)
    superclass: str  # the concept's class word
    name: str  # a short name (evaluation tables)


_SOURCES: dict[str, Callable[[str], ConceptSource]] = {}
_CAPTIONS: list[Callable[[dict, str], "list[str] | None"]] = []


def register_source(prefix: str, resolver: Callable[[str], ConceptSource]) -> None:
    """``prefix:<spec>`` (or the bare ``prefix``) resolves through ``resolver(spec)``."""
    if not prefix or ":" in prefix:
        raise ValueError(f"a concept source prefix is one word without ':' (got {prefix!r})")
    _SOURCES[prefix] = resolver


def register_captions(reader: Callable[[dict, str], "list[str] | None"]) -> None:
    """``reader(concept.json mapping, superclass)``: one caption per view, or None."""
    if reader not in _CAPTIONS:
        _CAPTIONS.append(reader)


def source_prefix(spec) -> str | None:
    """The registered (or plugin) prefix a spec names, or None for a plain folder."""
    head = str(spec).split(":", 1)[0]
    return head if head in _SOURCES or head in PLUGINS else None


def is_source(spec) -> bool:
    return source_prefix(spec) is not None


def resolve_source(spec) -> ConceptSource | None:
    """The concept a source spec names (its folder written on first use), or None when the
    spec is not a source (a folder path)."""
    prefix = source_prefix(spec)
    if prefix is None:
        return None
    if prefix not in _SOURCES:
        importlib.import_module(PLUGINS[prefix])  # the plugin registers itself
    rest = str(spec)[len(prefix) + 1:]
    return _SOURCES[prefix](rest)


def folder_captions(meta: dict, superclass: str) -> list[str] | None:
    """Captions of a concept folder's views from its ``concept.json`` (``captions``, else a
    plugin's reader), or None."""
    captions = meta.get("captions")
    if isinstance(captions, list):
        return [str(c) for c in captions]
    for module in PLUGINS.values():
        importlib.import_module(module)
    for reader in _CAPTIONS:
        out = reader(meta, superclass)
        if out is not None:
            return out
    return None


def _demo(spec: str) -> ConceptSource:
    from datamodules.synthetic import DEMO_SUPERCLASS, demo_concept_dir

    if spec:
        from components.errors import UserError

        raise UserError(f"demo:{spec}: the demo concept takes no options", fix="use concept_dir: demo")
    return ConceptSource(str(demo_concept_dir()), DEMO_SUPERCLASS, "demo")


register_source("demo", _demo)
