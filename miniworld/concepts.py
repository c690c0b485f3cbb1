"""Personal concepts as concept folders, and the MiniWorld prompt set.

A concept folder is what the concept DataModule reads for any subject: images plus
``<stem>_mask.png`` masks (single channel, white = subject). :func:`write_concept` adds
``concept.json`` (superclass word, a placeholder suggestion and the object's ground
truth) and ``prompts.txt`` (the prompt set), so the evaluation of a MiniWorld concept
needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.prompts import DREAMBOOTH_OBJECT_PROMPTS
from miniworld.world import CONCEPTS, World

#: The 25 DreamBooth object prompts, each drawable in MiniWorld: 20 contexts (one
#: scene each) and 5 attribute changes (colour, finish, shape).
PROMPTS = tuple(t.lower() for t in DREAMBOOTH_OBJECT_PROMPTS)


def write_concept(name: str, folder: str | Path, num_images: int = 5, size: int = 32, seed: int = 0,
                  placeholder: str = "sks") -> Path:
    """Write ``num_images`` views of concept ``name`` (each in a different scene) with masks.

    Returns the folder. Views depend only on ``(seed, name, index)``.
    """
    if name not in CONCEPTS:
        raise KeyError(f"Unknown MiniWorld concept {name!r}; available: {sorted(CONCEPTS)}.")
    if not 1 <= num_images <= 20:
        raise ValueError(f"num_images must be in 1..20 (one scene per view), got {num_images}.")
    concept, world = CONCEPTS[name], World(seed, size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(num_images):
        s = world.render_concept(concept, i)
        s.pil().save(folder / f"{i:02d}.png")
        s.mask_pil().save(folder / f"{i:02d}_mask.png")
        scenes.append(s.scene)
    meta = dict(
        name=name, superclass=concept.superclass, placeholder=placeholder,
        instance_prompt=f"a {placeholder} {concept.superclass}", class_prompt=f"a {concept.superclass}",
        object=dict(shape=concept.obj.shape, colour=concept.obj.colour, pattern=concept.obj.pattern),
        scenes=scenes, seed=seed, size=size,
    )
    (folder / "concept.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder
