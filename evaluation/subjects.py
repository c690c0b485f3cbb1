"""Subjects of an evaluation: real images, superclass word and prompt templates.

The DreamBooth protocol (Ruiz et al., 2023): a dataset root with one folder of images
per subject and ``prompts_and_classes.txt`` (subject -> class word). Live subjects (dogs,
cats) use the live-subject prompt set, the others the object set: 25 templates each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datamodules.prompts import dreambooth_prompts, prompt_set_for_class, read_dreambooth_classes, read_prompt_file


@dataclass
class Subject:
    name: str
    superclass: str
    images: Path  # folder of real images
    templates: list[str]  # prompt templates with a {} slot


def resolve_templates(prompts: str | list[str], superclass: str) -> list[str]:
    """``"auto"`` (the DreamBooth set of the class), ``"object"``, ``"live"``, a file of
    templates (one per line) or a list of templates."""
    if isinstance(prompts, (list, tuple)):
        templates = list(prompts)
    elif prompts == "auto":
        templates = dreambooth_prompts(prompt_set_for_class(superclass))
    elif prompts in ("object", "live"):
        templates = dreambooth_prompts(prompts)
    else:
        templates = read_prompt_file(prompts)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"Prompt template(s) without a '{{}}' slot for the subject: {bad[:3]}.")
    return templates


def dreambooth_subjects(
    root: str | os.PathLike, names: list[str] | None = None, prompts: str | list[str] = "auto"
) -> list[Subject]:
    """The subjects of a DreamBooth-layout root (all of them, or ``names``, in that order)."""
    root = Path(root)
    classes = read_dreambooth_classes(root)
    names = sorted(classes) if not names else list(names)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"Subject(s) {unknown} not in {root}/prompts_and_classes.txt; known: {', '.join(sorted(classes))}.")
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"Subject folder(s) {missing} missing under {root}.")
    return [Subject(n, classes[n], root / n, resolve_templates(prompts, classes[n])) for n in names]


def folder_subject(folder: str | os.PathLike, superclass: str, prompts: str | list[str] = "auto", name: str | None = None) -> Subject:
    """One subject from any folder of images and its class word (``"demo"``: the synthetic
    demo concept of the quickstart)."""
    from datamodules.concept import PROMPTS_FILE
    from datamodules.sources import resolve_source

    source = resolve_source(folder)  # the same concept sources as training's ConceptDataModule
    if source is not None:
        folder, superclass, name = source.folder, superclass or source.superclass, name or source.name
    folder = Path(folder)
    if not folder.is_dir():
        from components.errors import MissingFileError

        raise MissingFileError(f"concept image folder {folder} does not exist",
                               fix="pass a folder of the concept's images, 'demo' or 'miniworld:<concept>'")
    if not superclass or not superclass.strip():
        raise ValueError("A concept folder needs its superclass word (e.g. --superclass dog).")
    if prompts == "auto" and (folder / PROMPTS_FILE).is_file():
        prompts = str(folder / PROMPTS_FILE)  # the folder's own prompt set, as in training's validation
    return Subject(name or folder.name, superclass.strip(), folder, resolve_templates(prompts, superclass))
