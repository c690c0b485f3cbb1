"""A synthetic demo concept, drawn procedurally: no downloads, same pixels every time.

The concept is a ball with red and yellow stripes; five 64 px photos of it at different
places, sizes and stripe angles over different backgrounds, each with its subject mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEMO_SUPERCLASS = "ball"
_BACKGROUNDS = [((70, 130, 200), (230, 210, 160)), ((40, 110, 40), (90, 160, 70)), ((240, 240, 250), (200, 200, 215)),
                ((60, 60, 70), (120, 120, 130)), ((150, 90, 170), (200, 140, 210))]


def draw_demo_image(index: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 photo of the demo concept and its (size, size) bool mask."""
    rng = np.random.default_rng([seed, index])
    top, bottom = (np.array(c, dtype=np.float32) for c in _BACKGROUNDS[index % len(_BACKGROUNDS)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    img = top * (1 - yy[..., None]) + bottom * yy[..., None]  # vertical gradient
    img += rng.normal(0, 6, img.shape)  # texture
    r = size * rng.uniform(0.22, 0.32)
    cy, cx = size * rng.uniform(0.4, 0.6, 2)
    py, px = yy * (size - 1) - cy, xx * (size - 1) - cx
    mask = py**2 + px**2 <= r**2
    angle = rng.uniform(-0.5, 0.5)
    stripes = np.sin((px * np.cos(angle) + py * np.sin(angle)) / r * 3 * np.pi) > 0
    ball = np.where(stripes[..., None], np.array([220, 30, 30]), np.array([250, 210, 20])).astype(np.float32)
    shade = 1.0 - 0.35 * np.clip((px + py) / (2 * r), -1, 1)[..., None]  # light from the top left
    img = np.where(mask[..., None], ball * shade, img)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_demo_concept(folder: str | Path, num_images: int = 5, size: int = 64, seed: int = 0) -> Path:
    """Write the demo concept as a concept folder: ``NN.png`` + ``NN_mask.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        img, mask = draw_demo_image(i, size, seed)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:02d}_mask.png")
    return folder


def demo_concept_dir() -> Path:
    """The demo concept folder in the cache, written on first use."""
    from components.loader import cache_dir

    folder = cache_dir() / "demo-concept-v1"
    if not (folder / "00.png").exists():
        from components.atomic import atomic_path

        with atomic_path(folder, replace=False) as tmp:
            write_demo_concept(tmp)
    return folder
