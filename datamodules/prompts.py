"""Prompt sets as templates with one ``{}`` slot for the subject.

The 25 DreamBooth evaluation prompts (Ruiz et al., 2023; object and live-subject sets),
written so that the slot takes ``"sks dog"`` (concept) or ``"dog"`` (superclass).
"""

from __future__ import annotations

from pathlib import Path

_SHARED_CONTEXTS = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]
_ATTRIBUTES = ["a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}"]

DREAMBOOTH_OBJECT_PROMPTS: list[str] = _SHARED_CONTEXTS + [
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
] + _ATTRIBUTES

DREAMBOOTH_LIVE_PROMPTS: list[str] = _SHARED_CONTEXTS + [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
] + _ATTRIBUTES

#: DreamBooth classes whose subjects use the live-subject prompt set.
LIVE_CLASSES = {"dog", "cat"}

PROMPT_SETS = {"object": DREAMBOOTH_OBJECT_PROMPTS, "live": DREAMBOOTH_LIVE_PROMPTS}


def dreambooth_prompts(kind: str) -> list[str]:
    """The 25 DreamBooth prompt templates of one set: ``"object"`` or ``"live"``."""
    if kind not in PROMPT_SETS:
        raise ValueError(f"Unknown DreamBooth prompt set {kind!r}: choose 'object' or 'live'.")
    return list(PROMPT_SETS[kind])


def prompt_set_for_class(class_word: str) -> str:
    """``"live"`` for animals (dog, cat), ``"object"`` otherwise, as in DreamBooth."""
    return "live" if class_word.strip().lower() in LIVE_CLASSES else "object"


def read_prompt_file(path: str | Path) -> list[str]:
    """One template per line; blank lines and ``#`` comments skipped."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"Prompt file {path} holds no prompts (one template per line, e.g. 'a {{}} on the beach').")
    return prompts


def read_dreambooth_classes(root: str | Path) -> dict[str, str]:
    """Subject -> class word from a DreamBooth-layout ``prompts_and_classes.txt``."""
    path = Path(root) / "prompts_and_classes.txt"
    if not path.exists():
        from components.errors import MissingFileError

        raise MissingFileError(f"{path} not found: a DreamBooth dataset root holds one folder per subject and "
                               "prompts_and_classes.txt", fix="set --data.dreambooth_root to the DreamBooth dataset folder")
    classes: dict[str, str] = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] and parts[0] != "subject_name" and " " not in parts[0]:
            classes[parts[0]] = parts[1]
    return classes
