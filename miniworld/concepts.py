"""Personal concepts as concept folders, and the MiniWorld prompt set.

A concept folder is what the concept DataModule reads for any subject: images plus
``<stem>_mask.png`` masks (single channel, white = subject). :func:`write_concept` adds
``concept.json`` (superclass word, a placeholder suggestion, the object's ground truth
and the scenes of the views) and ``prompts.txt`` (the prompt set), so the evaluation of a
MiniWorld concept needs nothing else.

How the views are photographed (``context``):

- ``"scene"`` (the default): every view in the concept's one home scene
  (:data:`HOME_SCENES`), as real subject photos share a room or a table; the object's
  place, size and lighting details change from view to view. A model fine-tuned on
  these views can learn the scene with the subject (context overfitting).
- ``"prop"``: as ``"scene"``, plus the same small background object (:data:`PROP`,
  a white cross) beside the subject in every view: a second level of shared context.
- ``"varied"``: each view in another scene (nothing of the context is shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datamodules.prompts import DREAMBOOTH_OBJECT_PROMPTS
from miniworld.world import CONCEPTS, SCENE_NAMES, ObjectSpec, Sample, World

#: The 25 DreamBooth object prompts, each drawable in MiniWorld: 20 contexts (one
#: scene each) and 5 attribute changes (colour, finish, shape).
PROMPTS = tuple(t.lower() for t in DREAMBOOTH_OBJECT_PROMPTS)

#: How a concept's views share their context (see the module docstring).
CONTEXTS = ("scene", "prop", "varied")

#: The scene every view of a concept is photographed in, for ``context="scene"``/``"prop"``.
HOME_SCENES = {
    "orange_checkered_ball": "wooden_floor",
    "green_dotted_cube": "white_rug",
    "blue_striped_star": "pink_fabric",
    "yellow_striped_heart": "purple_rug",
    "pink_dotted_pyramid": "beach",
}

#: The shared background object of ``context="prop"``: small, beside the subject.
PROP = ObjectSpec("cross", "white")


def _add_prop(world: World, sample: Sample, rng: np.random.Generator) -> Sample:
    """Draw :data:`PROP` small, left or right of the subject and behind it."""
    from miniworld.draw import draw_object

    k = world.supersample
    S = world.size * k
    cols = np.nonzero(sample.mask.any(0))[0]
    centre = (cols.min() + cols.max() + 1) / 2 / world.size if len(cols) else 0.5
    cx = (0.13 if centre > 0.5 else 0.87) * S  # on the side with more room
    cy, r = rng.uniform(0.55, 0.62) * S, 0.12 * S
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    rgb, mask = draw_object((xx - cx) / r, (yy - cy) / r, PROP.shape, PROP.colour, PROP.pattern, PROP.finish, rng,
                            outline_px=k)
    cover = mask.reshape(world.size, k, world.size, k).mean((1, 3))[..., None]  # (H, W, 1) in [0, 1]
    small = (rgb * mask[..., None]).reshape(world.size, k, world.size, k, 3).sum((1, 3)) / (k * k)
    colour = np.where(cover > 0, small / np.maximum(cover, 1e-6), 0)
    image = sample.image.astype(np.float32) / 255
    blended = image * (1 - cover) + colour * cover
    keep = sample.mask[..., None]  # the subject stays in front
    image = np.where(keep, image, blended)
    out = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Sample(out, sample.mask, sample.caption, sample.obj, sample.scene)


def concept_views(name: str, num_images: int = 5, context: str = "scene", size: int = 32, seed: int = 0) -> list[Sample]:
    """The ``num_images`` views of concept ``name`` photographed in ``context`` (see
    :data:`CONTEXTS`). Views depend only on ``(seed, name, context, index)``."""
    if name not in CONCEPTS:
        raise KeyError(f"Unknown MiniWorld concept {name!r}; available: {sorted(CONCEPTS)}.")
    if context not in CONTEXTS:
        raise ValueError(f"Unknown concept context {context!r}: choose one of {', '.join(CONTEXTS)}.")
    if not 1 <= num_images <= 20:
        raise ValueError(f"num_images must be in 1..20, got {num_images}.")
    world = World(seed, size)
    if context == "varied":
        return [world.render_concept(name, i) for i in range(num_images)]
    scene = HOME_SCENES[name]
    views = []
    for i in range(num_images):
        view = world.render_concept(name, i, scene=scene)
        if context == "prop":
            view = _add_prop(world, view, np.random.default_rng([seed, 4, i, *name.encode()]))
        views.append(view)
    return views


def write_concept(name: str, folder: str | Path, num_images: int = 5, size: int = 32, seed: int = 0,
                  placeholder: str = "sks", context: str = "scene") -> Path:
    """Write ``num_images`` views of concept ``name`` (photographed in ``context``) with masks.

    Returns the folder. Views depend only on ``(seed, name, context, index)``.
    """
    concept = CONCEPTS.get(name)
    views = concept_views(name, num_images, context, size, seed)  # validates name, context, num_images
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(views):
        s.pil().save(folder / f"{i:02d}.png")
        s.mask_pil().save(folder / f"{i:02d}_mask.png")
    meta = dict(
        name=name, superclass=concept.superclass, placeholder=placeholder,
        instance_prompt=f"a {placeholder} {concept.superclass}", class_prompt=f"a {concept.superclass}",
        object=dict(shape=concept.obj.shape, colour=concept.obj.colour, pattern=concept.obj.pattern),
        context=context, scenes=[s.scene for s in views], seed=seed, size=size,
        **({"prop": dict(shape=PROP.shape, colour=PROP.colour)} if context == "prop" else {}),
    )
    (folder / "concept.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


def read_concept_truth(folder: str | Path) -> ObjectSpec | None:
    """The ground-truth object of a MiniWorld concept folder (from its ``concept.json``),
    or None when the folder is not one."""
    path = Path(folder) / "concept.json"
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text()).get("object")
        return ObjectSpec(obj["shape"], obj["colour"], obj.get("pattern", "plain"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


__all__ = ["PROMPTS", "CONTEXTS", "HOME_SCENES", "PROP", "concept_views", "write_concept", "read_concept_truth",
           "SCENE_NAMES"]
