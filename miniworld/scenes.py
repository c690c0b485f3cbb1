"""Backgrounds of MiniWorld: one painter per scene.

There is one scene per context of the 20 DreamBooth context prompts ("in the jungle",
"on a cobblestone street", ...), each painted so that it stays recognisable at 32 px:
a palette and a layout (sky/ground split, texture) of its own. A painter takes a numpy
random generator and the canvas side ``S`` and returns an ``(S, S, 3)`` float image in
[0, 1]; the world renders at a multiple of the output size and downsamples, so edges
are anti-aliased.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Painter = Callable[[np.random.Generator, int], np.ndarray]


# --------------------------------------------------------------------------- helpers


def grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)`` in [0, 1], y pointing down."""
    c = (np.arange(S) + 0.5) / S
    return np.meshgrid(c, c, indexing="ij")


def fill(S: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (S, S, 3)).copy()


def jitter(rng: np.random.Generator, rgb, amount: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def paint(img: np.ndarray, where: np.ndarray, rgb, alpha: float | np.ndarray = 1.0) -> None:
    """Blend ``rgb`` into ``img`` where the boolean/float ``where`` is set."""
    a = (where.astype(np.float32) * alpha)[..., None]
    img *= 1 - a
    img += a * np.asarray(rgb, np.float32)


def ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1


def sky_ground(rng, S, sky, ground, horizon) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    y, x = grid(S)
    h = horizon + rng.uniform(-0.04, 0.04)
    img = fill(S, jitter(rng, ground))
    paint(img, y < h, jitter(rng, sky))
    return img, y, x, h


# --------------------------------------------------------------------------- painters


def jungle(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.05, 0.28, 0.08)))
    for _ in range(5):  # hanging vines
        cx = rng.uniform(0, 1)
        paint(img, np.abs(x - cx - 0.03 * np.sin(9 * y)) < 0.012, (0.02, 0.15, 0.04))
    for _ in range(28):  # leaves
        g = rng.uniform(0.4, 0.65)
        paint(img, ellipse(y, x, rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.06), rng.uniform(0.07, 0.13)),
              (rng.uniform(0.05, 0.2), g, rng.uniform(0.05, 0.15)))
    return img


def snow(rng, S):
    img, y, x, h = sky_ground(rng, S, (0.72, 0.8, 0.9), (0.97, 0.97, 1.0), 0.42)
    paint(img, (y < h) & (y > h - 0.12 + 0.06 * np.sin(7 * x + rng.uniform(0, 6))), (0.85, 0.88, 0.95))  # hills
    for _ in range(40):  # falling flakes
        paint(img, ellipse(y, x, rng.uniform(0, 1), rng.uniform(0, 1), 0.012, 0.012), (1, 1, 1))
    return img


def beach(rng, S):
    img, y, x, h = sky_ground(rng, S, (0.45, 0.75, 0.98), (0.93, 0.82, 0.55), 0.45)
    paint(img, (y > h - 0.13) & (y < h), jitter(rng, (0.05, 0.42, 0.78)))  # sea
    paint(img, np.abs(y - h - 0.01 * np.sin(30 * x)) < 0.012, (1, 1, 1))  # surf line
    paint(img, ellipse(y, x, 0.1, rng.uniform(0.1, 0.9), 0.07, 0.07), (1.0, 0.93, 0.4))  # sun
    return img


def cobblestone_street(rng, S):
    y, x = grid(S)
    img = fill(S, (0.25, 0.24, 0.23))  # mortar
    rows = 7
    for r in range(rows):
        offset = rng.uniform(0, 1) / 4
        for c in range(-1, 5):
            cy, cx = (r + 0.5) / rows, (c + 0.5) / 4 + offset
            paint(img, ellipse(y, x, cy, cx, 0.055, 0.11), jitter(rng, (0.58, 0.56, 0.52), 0.08))
    return img


def pink_fabric(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.96, 0.62, 0.74)))
    phase, freq = rng.uniform(0, 6), rng.uniform(9, 13)
    img *= (0.85 + 0.15 * np.sin(freq * (x + 0.6 * y) + phase))[..., None]  # soft folds
    return img


def wooden_floor(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.6, 0.38, 0.2)))
    plank = 1 / 7
    row = np.floor(y / plank)
    img *= (0.9 + 0.1 * np.sin(row * 7.3 + rng.uniform(0, 6)))[..., None]  # plank tone
    img *= (0.93 + 0.07 * np.sin(40 * y + 3 * np.sin(6 * x)))[..., None]  # grain
    paint(img, (y % plank) < 0.012, (0.3, 0.17, 0.08))  # seams
    return img


def city(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.7, 0.8, 0.95), (0.3, 0.3, 0.32), 0.88)
    left = -0.05
    while left < 1:
        w, top = rng.uniform(0.1, 0.2), rng.uniform(0.1, 0.5)
        body = (x > left) & (x < left + w) & (y > top) & (y < 0.88)
        paint(img, body, jitter(rng, (0.42, 0.42, 0.47), 0.08))
        win = body & ((x * 40) % 1 < 0.35) & ((y * 30) % 1 < 0.35)
        paint(img, win, (0.98, 0.9, 0.5))
        left += w + rng.uniform(0.0, 0.03)
    return img


def mountain(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.5, 0.7, 0.95), (0.35, 0.6, 0.25), 0.75)
    for _ in range(3):
        px, top, half = rng.uniform(0.1, 0.9), rng.uniform(0.12, 0.3), rng.uniform(0.3, 0.45)
        peak = (y > top + np.abs(x - px) * (0.75 - top) / half) & (y < 0.76)
        paint(img, peak, jitter(rng, (0.45, 0.44, 0.55), 0.05))
        paint(img, peak & (y < top + 0.1), (0.97, 0.97, 1.0))  # snow cap
    return img


def blue_house(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.7, 0.85, 1.0), (0.3, 0.65, 0.25), 0.72)
    left = rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.4, 0.5)])
    w, top = 0.55, rng.uniform(0.32, 0.4)
    body = (x > left) & (x < left + w) & (y > top) & (y < 0.74)
    paint(img, body, jitter(rng, (0.15, 0.3, 0.85)))
    roof = (y < top) & (y > top - 0.22 + np.abs(x - left - w / 2) * 0.22 / (w / 2 + 0.06))
    paint(img, roof, (0.55, 0.12, 0.1))
    for wx in (left + 0.08, left + w - 0.18):
        paint(img, (x > wx) & (x < wx + 0.1) & (y > top + 0.08) & (y < top + 0.18), (0.95, 0.95, 0.85))
    return img


def purple_rug_forest(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.08, 0.25, 0.12), (0.2, 0.3, 0.12), 0.55)
    for _ in range(6):  # trunks
        tx = rng.uniform(0, 1)
        paint(img, (np.abs(x - tx) < 0.025) & (y < 0.6), (0.3, 0.2, 0.12))
    rug = (y > 0.58) & (x > 0.04) & (x < 0.96) & (y < 0.98)
    paint(img, rug, jitter(rng, (0.5, 0.2, 0.62)))
    inner = (y > 0.63) & (x > 0.09) & (x < 0.91) & (y < 0.93)
    paint(img, rug & ~inner, (0.75, 0.5, 0.85))  # border
    return img


def wheat_field(rng, S):
    img, y, x, h = sky_ground(rng, S, (0.72, 0.84, 0.96), (0.9, 0.74, 0.3), 0.38)
    stalks = (y > h) & (np.sin(90 * x + 4 * np.sin(20 * y)) > 0.6)
    paint(img, stalks, (0.75, 0.55, 0.18))
    paint(img, np.abs(y - h) < 0.03, (0.96, 0.85, 0.45))  # ears along the top
    return img


def autumn_tree(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.93, 0.86, 0.72), (0.55, 0.35, 0.18), 0.8)
    tx = rng.uniform(0.25, 0.75)
    paint(img, (np.abs(x - tx) < 0.05) & (y > 0.35) & (y < 0.82), (0.35, 0.2, 0.1))
    for _ in range(26):  # canopy and fallen leaves
        cy = rng.uniform(0.0, 0.45) if rng.random() < 0.75 else rng.uniform(0.8, 1.0)
        paint(img, ellipse(y, x, cy, rng.uniform(0, 1), rng.uniform(0.05, 0.1), rng.uniform(0.06, 0.12)),
              (rng.uniform(0.85, 1.0), rng.uniform(0.25, 0.55), 0.05))
    return img


def eiffel_tower(rng, S):
    y, x = grid(S)
    img = (1 - y)[..., None] * np.float32([0.98, 0.6, 0.55]) + y[..., None] * np.float32([1.0, 0.85, 0.6])  # sunset
    tx = rng.choice([rng.uniform(0.14, 0.22), rng.uniform(0.78, 0.86)])
    half = 0.02 + 0.16 * y**2  # flaring legs
    tower = (np.abs(x - tx) < half) & (y > 0.05)
    hollow = (np.abs(x - tx) < half - 0.035) & (y > 0.6)  # arch between the legs
    paint(img, tower & ~hollow, (0.28, 0.22, 0.2))
    paint(img, tower & (np.abs(y - 0.42) < 0.015), (0.28, 0.22, 0.2))
    paint(img, y > 0.9, (0.4, 0.5, 0.3))
    return img


def water(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.12, 0.42, 0.75)))
    waves = np.sin(30 * y + 2.5 * np.sin(10 * x + rng.uniform(0, 6)))
    paint(img, waves > 0.8, (0.45, 0.7, 0.95))
    return img


def milk_ocean(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.98, 0.96, 0.88), 0.02))
    waves = np.sin(22 * y + 2 * np.sin(8 * x + rng.uniform(0, 6)))
    paint(img, waves > 0.75, (0.85, 0.82, 0.72))
    return img


def sunflower_grass(rng, S):
    y, x = grid(S)
    img = fill(S, jitter(rng, (0.3, 0.66, 0.2)))
    paint(img, np.sin(120 * x + 5 * y) > 0.7, (0.2, 0.5, 0.12))  # blades
    for _ in range(9):
        cy, cx = rng.uniform(0, 1), rng.uniform(0, 1)
        paint(img, ellipse(y, x, cy, cx, 0.07, 0.07), (1.0, 0.85, 0.05))
        paint(img, ellipse(y, x, cy, cx, 0.03, 0.03), (0.35, 0.2, 0.05))
    return img


def mirror(rng, S):
    y, x = grid(S)
    img = fill(S, (0.78, 0.8, 0.84))
    img *= (0.85 + 0.2 * y)[..., None]
    for _ in range(2):  # glare streaks
        off = rng.uniform(-0.5, 0.8)
        paint(img, np.abs(x + y - 1 - off) < 0.04, (0.97, 0.98, 1.0), 0.7)
    paint(img, (x < 0.03) | (x > 0.97) | (y < 0.03) | (y > 0.97), (0.55, 0.5, 0.45))  # frame
    return img


def crowded_sidewalk(rng, S):
    img, y, x, _ = sky_ground(rng, S, (0.6, 0.6, 0.62), (0.74, 0.73, 0.7), 0.55)
    paint(img, (y > 0.55) & (((x + (y - 0.55) * 0.5) * 8) % 1 < 0.06), (0.55, 0.55, 0.53))  # tiles
    for _ in range(14):  # people: coat and head
        px, top = rng.uniform(0, 1), rng.uniform(0.15, 0.3)
        coat = rng.uniform(0.1, 0.9, 3)
        paint(img, ellipse(y, x, top + 0.2, px, 0.17, 0.045), coat)
        paint(img, ellipse(y, x, top, px, 0.035, 0.03), (0.85, 0.65, 0.5))
    return img


def dirt_road(rng, S):
    img, y, x, h = sky_ground(rng, S, (0.65, 0.8, 0.95), (0.35, 0.6, 0.25), 0.35)
    road = (y > h) & (np.abs(x - 0.5) < 0.08 + 0.55 * (y - h))
    paint(img, road, jitter(rng, (0.62, 0.46, 0.28)))
    ruts = road & (np.abs(np.abs(x - 0.5) - 0.25 * (y - h)) < 0.02)
    paint(img, ruts, (0.45, 0.32, 0.18))
    return img


def white_rug(rng, S):
    y, x = grid(S)
    img = fill(S, (0.55, 0.35, 0.2))  # floor behind the rug
    rug = (y > 0.18) & (x > 0.03) & (x < 0.97)
    paint(img, rug, (0.94, 0.94, 0.91))
    shag = rng.uniform(-0.07, 0.07, (S, S)).astype(np.float32)
    img[rug] = np.clip(img[rug] + shag[rug, None], 0, 1)
    paint(img, np.abs(y - 0.18) < 0.02, (0.8, 0.8, 0.76))  # fringe
    return img


#: scene name -> (caption phrase, painter); the phrases are the contexts of the
#: DreamBooth prompt set, in its order.
SCENES: dict[str, tuple[str, Painter]] = {
    "jungle": ("in the jungle", jungle),
    "snow": ("in the snow", snow),
    "beach": ("on the beach", beach),
    "cobblestone": ("on a cobblestone street", cobblestone_street),
    "pink_fabric": ("on top of pink fabric", pink_fabric),
    "wooden_floor": ("on top of a wooden floor", wooden_floor),
    "city": ("with a city in the background", city),
    "mountain": ("with a mountain in the background", mountain),
    "blue_house": ("with a blue house in the background", blue_house),
    "purple_rug": ("on top of a purple rug in a forest", purple_rug_forest),
    "wheat_field": ("with a wheat field in the background", wheat_field),
    "autumn": ("with a tree and autumn leaves in the background", autumn_tree),
    "eiffel_tower": ("with the eiffel tower in the background", eiffel_tower),
    "water": ("floating on top of water", water),
    "milk": ("floating in an ocean of milk", milk_ocean),
    "sunflowers": ("on top of green grass with sunflowers around it", sunflower_grass),
    "mirror": ("on top of a mirror", mirror),
    "sidewalk": ("on top of the sidewalk in a crowded street", crowded_sidewalk),
    "dirt_road": ("on top of a dirt road", dirt_road),
    "white_rug": ("on top of a white rug", white_rug),
}
