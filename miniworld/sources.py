"""MiniWorld as a concept source: ``miniworld:<concept>[:<context>][:<views>]`` in
``concept_dir`` (training), evaluate.py's folders and ``references`` resolves to a concept
folder written into the cache on first use. Importing this module registers the source
(and the captions of MiniWorld views) with :mod:`datamodules.sources`."""

from __future__ import annotations


from components.atomic import atomic_path
from datamodules.concept import ConceptDataError
from datamodules.sources import ConceptSource, register_captions, register_source

PREFIX = "miniworld"


def miniworld_concept_dir(spec: str) -> tuple[str, str]:
    """A MiniWorld personal concept as a concept folder in the cache (written on first use),
    and its superclass word. ``spec``: ``<concept>[:<context>][:<views>]``."""
    from components.loader import cache_dir
    from miniworld.concepts import CONTEXTS, write_concept
    from miniworld.world import CONCEPTS

    name, *options = spec.split(":")
    if name not in CONCEPTS:
        raise ConceptDataError(f"Unknown MiniWorld concept {name!r}: choose one of {', '.join(sorted(CONCEPTS))}.")
    context, views = "scene", 5
    for opt in options:
        if opt in CONTEXTS:
            context = opt
        elif opt.isdigit() and 1 <= int(opt) <= 20:
            views = int(opt)
        else:
            raise ConceptDataError(f"miniworld:{spec}: {opt!r} is neither a context ({', '.join(CONTEXTS)}) nor a "
                                   "number of views (1-20), e.g. miniworld:green_dotted_cube:varied:6.")
    folder = cache_dir() / f"miniworld-concept-{name}-{context}-{views}-v2"
    if not (folder / "concept.json").exists():
        with atomic_path(folder, replace=False) as tmp:
            write_concept(name, tmp, num_images=views, context=context)
    return str(folder), CONCEPTS[name].superclass


def _resolve(spec: str) -> ConceptSource:
    folder, superclass = miniworld_concept_dir(spec)
    return ConceptSource(folder, superclass, spec.split(":")[0])


def _captions(meta: dict, superclass: str) -> list[str] | None:
    """MiniWorld concept views: 'a <superclass> <the scene's phrase>' per view."""
    if not isinstance(meta.get("scenes"), list):
        return None
    from miniworld.scenes import SCENES

    return [f"a {superclass} {SCENES[s][0]}" for s in meta["scenes"]]


register_source(PREFIX, _resolve)
register_captions(_captions)
