"""MiniWorld: a procedural world of captioned images for personalization experiments.

Every image shows one object (shape x colour x pattern, optionally shiny or wet) in one
of 20 scenes, one per context of the DreamBooth prompt set; its caption is written in
the DreamBooth prompt style ("a red striped ball on the beach") and its object mask is
known. ``World(seed).sample(i)`` is a pure function of ``(seed, i)``, so the world is an
unlimited, reproducible dataset.

Personal concepts (:data:`CONCEPTS`) are shape/colour/pattern combinations that the
world never draws when sampling, so a model pretrained on the world has never seen them;
their superclass is the shape word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from miniworld.draw import COLOURS, FINISHES, PATTERNS, SHAPES, draw_object
from miniworld.scenes import SCENES

SHAPE_NAMES = tuple(SHAPES)
COLOUR_NAMES = tuple(COLOURS)
SCENE_NAMES = tuple(SCENES)
PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of")


@dataclass(frozen=True)
class ObjectSpec:
    """What an object is: its identity is (shape, colour, pattern); finish is a state."""

    shape: str
    colour: str
    pattern: str = "plain"
    finish: str = "plain"

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.pattern)

    def phrase(self, colour: bool = True, pattern: bool = True, noun: str | None = None) -> str:
        """"shiny red striped ball"; the plain finish and the plain pattern are not said."""
        words = [self.finish] if self.finish != "plain" else []
        words += [self.colour] if colour else []
        words += [self.pattern] if pattern and self.pattern != "plain" else []
        return " ".join(words + [noun or self.shape])


@dataclass(frozen=True)
class Concept:
    """A personal concept: an object the pretraining world never shows."""

    name: str
    obj: ObjectSpec

    @property
    def superclass(self) -> str:
        return self.obj.shape


#: Held out of pretraining. None is red or purple, so "a red {}" / "a purple {}" of the
#: prompt set always change the colour.
CONCEPTS = {
    c.name: c
    for c in (
        Concept("orange_checkered_ball", ObjectSpec("ball", "orange", "checkered")),
        Concept("green_dotted_cube", ObjectSpec("cube", "green", "dotted")),
        Concept("blue_striped_star", ObjectSpec("star", "blue", "striped")),
        Concept("yellow_striped_heart", ObjectSpec("heart", "yellow", "striped")),
        Concept("pink_dotted_pyramid", ObjectSpec("pyramid", "pink", "dotted")),
    )
}
HELD_OUT = frozenset(c.obj.identity for c in CONCEPTS.values())


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True on the object
    caption: str
    obj: ObjectSpec
    scene: str

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)

    def mask_pil(self) -> Image.Image:
        return Image.fromarray(self.mask.astype(np.uint8) * 255)  # (H, W) uint8: mode L

    def labels(self) -> dict[str, int]:
        """Class indices of the ground truth, as the judge predicts them."""
        return label_indices(self.obj, self.scene)


def label_indices(obj: ObjectSpec, scene: str) -> dict[str, int]:
    return dict(
        scene=SCENE_NAMES.index(scene), shape=SHAPE_NAMES.index(obj.shape), colour=COLOUR_NAMES.index(obj.colour),
        pattern=PATTERNS.index(obj.pattern), finish=FINISHES.index(obj.finish),
    )


class World:
    """A seeded generator of ``(image, mask, caption)`` samples.

    Args:
        seed: world seed; ``sample(i)`` depends only on ``(seed, i)``.
        size: output side in pixels (the models use 32; 16–128 render).
        held_out: object identities never drawn by :meth:`sample` (the concepts).
        supersample: render at ``size * supersample`` and box-downsample (anti-aliasing).
        p_colour, p_pattern, p_scene: probability that a caption names the colour, the
            pattern (when not plain) and the scene; otherwise the word is left out, so the
            shape word alone ("a ball") is a meaningful prompt.
        p_finish: probability of a shiny or wet object (always named in the caption).
        p_prefix: probability of "a photo of" / "a rendering of" / ... before the caption.
        p_shape_change: probability of a "cube shaped ball" caption: the drawn shape comes
            first, followed by another shape word as the noun.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 32,
        held_out: frozenset = HELD_OUT,
        supersample: int = 4,
        p_colour: float = 0.85,
        p_pattern: float = 0.75,
        p_scene: float = 0.9,
        p_finish: float = 0.2,
        p_prefix: float = 0.25,
        p_shape_change: float = 0.04,
    ):
        if not 16 <= size <= 128:
            raise ValueError(f"MiniWorld image size must be between 16 and 128 px, got {size}.")
        self.seed, self.size, self.held_out, self.supersample = seed, size, frozenset(held_out), supersample
        self.p_colour, self.p_pattern, self.p_scene = p_colour, p_pattern, p_scene
        self.p_finish, self.p_prefix, self.p_shape_change = p_finish, p_prefix, p_shape_change

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    def sample(self, i: int) -> Sample:
        rng = self.rng(i)
        obj = self.random_object(rng)
        scene = SCENE_NAMES[rng.integers(len(SCENE_NAMES))]
        image, mask = self.render(obj, scene, rng)
        return Sample(image, mask, self.caption(obj, scene, rng), obj, scene)

    def random_object(self, rng: np.random.Generator) -> ObjectSpec:
        while True:
            shape, colour = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            pattern = PATTERNS[rng.integers(len(PATTERNS))]
            if (shape, colour, pattern) not in self.held_out:
                break
        finish = "plain" if rng.random() >= self.p_finish else ("shiny", "wet")[rng.integers(2)]
        return ObjectSpec(shape, colour, pattern, finish)

    def caption(self, obj: ObjectSpec, scene: str, rng: np.random.Generator) -> str:
        noun = None
        if rng.random() < self.p_shape_change:
            others = [s for s in SHAPE_NAMES if s != obj.shape]
            noun = f"{others[rng.integers(len(others))]}"
        text = obj.phrase(colour=rng.random() < self.p_colour, pattern=rng.random() < self.p_pattern, noun=noun)
        if noun is not None:  # "a cube shaped red ball": the drawn shape, then any noun
            text = f"{obj.shape} shaped {text}"
        text = f"a {text}"
        if rng.random() < self.p_scene:
            text += " " + SCENES[scene][0]
        if rng.random() < self.p_prefix:
            text = f"{PREFIXES[rng.integers(len(PREFIXES))]} {text}"
        return text

    def render(self, obj: ObjectSpec, scene: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``obj`` in ``scene``: ``(image (H, W, 3) uint8, mask (H, W) bool)``."""
        if scene not in SCENES:
            raise ValueError(f"Unknown scene {scene!r}; expected one of {SCENE_NAMES}.")
        k = self.supersample
        S = self.size * k
        canvas = SCENES[scene][1](rng, S).astype(np.float32)
        # layout: large, roughly centred, on the ground (higher above a mirror)
        r = rng.uniform(0.25, 0.33) * S
        cx = rng.uniform(0.38, 0.62) * S
        cy = (rng.uniform(0.33, 0.42) if scene == "mirror" else rng.uniform(0.45, 0.6)) * S
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
        u, v = (xx - cx) / r, (yy - cy) / r
        rgb, mask = draw_object(u, v, obj.shape, obj.colour, obj.pattern, obj.finish, rng, outline_px=k)
        if scene == "mirror":  # the reflection, flipped about the object's lowest row
            bottom = int(np.nonzero(mask.any(1))[0].max())
            src = np.clip(2 * bottom - np.arange(S), 0, S - 1)
            below = (np.arange(S) > bottom)[:, None]
            refl = mask[src] & below
            canvas[refl] = 0.55 * canvas[refl] + 0.45 * rgb[src][refl]
        else:  # a soft shadow under the object
            shadow = ((u / 0.9) ** 2 + ((v - 0.95) / 0.22) ** 2) < 1
            canvas[shadow] *= 0.65
        canvas[mask] = rgb[mask]
        image = canvas.reshape(self.size, k, self.size, k, 3).mean((1, 3))
        small_mask = mask.reshape(self.size, k, self.size, k).mean((1, 3)) > 0.5
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), small_mask

    def render_concept(self, concept: Concept | str, index: int, scene: str | None = None) -> Sample:
        """View ``index`` of a concept, in ``scene`` or a scene picked from ``index``."""
        concept = CONCEPTS[concept] if isinstance(concept, str) else concept
        rng = np.random.default_rng([self.seed, 1, index, *concept.name.encode()])
        if scene is None:  # a fixed shuffle of the scenes per concept, so views differ
            order = np.random.default_rng([self.seed, 2, *concept.name.encode()]).permutation(len(SCENE_NAMES))
            scene = SCENE_NAMES[order[index % len(order)]]
        image, mask = self.render(concept.obj, scene, rng)
        return Sample(image, mask, f"a {concept.obj.phrase()} {SCENES[scene][0]}", concept.obj, scene)

    def contact_sheet(self, per_row: int = 8, scale: int = 3) -> Image.Image:
        """One row per scene (random objects), then one row per concept (its views)."""
        rows = []
        for k, scene in enumerate(SCENE_NAMES):
            rng = np.random.default_rng([self.seed, 3, k])
            rows.append([self.render(self.random_object(rng), scene, rng)[0] for _ in range(per_row)])
        for name in CONCEPTS:
            rows.append([self.render_concept(name, i).image for i in range(per_row)])
        sheet = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
        return Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)


__all__ = [
    "World", "Sample", "ObjectSpec", "Concept", "CONCEPTS", "HELD_OUT", "SHAPE_NAMES", "COLOUR_NAMES",
    "SCENE_NAMES", "PATTERNS", "FINISHES", "label_indices",
]
