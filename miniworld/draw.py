"""Objects of MiniWorld: shape masks, colours, surface patterns and finishes.

Shapes are drawn in object-local coordinates ``(u, v)``: the object centre is the
origin, one unit is the object's half size, ``v`` points down. A shape gives its mask
and a shading factor (the faces of the cube, the lit side of the ball), a pattern gives
where its marks are, a finish ("shiny", "wet") changes the surface.
"""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.05),
    "yellow": (0.98, 0.88, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.3, 0.92),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.0, 0.5, 0.75),
    "white": (0.96, 0.96, 0.96),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
FINISHES = ("plain", "shiny", "wet")
OUTLINE = (0.08, 0.08, 0.1)


# --------------------------------------------------------------------------- shapes


def polygon(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels."""
    inside = np.zeros(u.shape, bool)
    pts = np.asarray(pts, np.float32)
    for (u0, v0), (u1, v1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (v0 > v) != (v1 > v)
        at = u0 + (v - v0) * (u1 - u0) / (v1 - v0 + 1e-12)
        inside ^= crosses & (u < at)
    return inside


def _ball(u, v):
    rho2 = u**2 + v**2
    nz = np.sqrt(np.clip(1 - rho2, 0, 1))  # sphere normal, lit from the upper left
    light = np.clip((-0.45 * u - 0.55 * v + 0.7 * nz), 0, 1)
    return rho2 < 1, 0.6 + 0.5 * light


def _cube(u, v):
    s = 0.87
    hexagon = polygon(u, v, [(0, -1), (s, -0.5), (s, 0.5), (0, 1), (-s, 0.5), (-s, -0.5)])
    top = polygon(u, v, [(0, -1), (s, -0.5), (0, 0), (-s, -0.5)])
    left = hexagon & ~top & (u < 0)
    return hexagon, np.where(top, 1.15, np.where(left, 0.9, 0.68))


def _pyramid(u, v):
    tri = polygon(u, v, [(0, -1), (1, 0.85), (-1, 0.85)])
    return tri, np.where(u < 0.25 * (v + 1) / 1.85, 1.05, 0.75)


def _star(u, v):
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.15, 0.5)
    return polygon(u, v, np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.08], 1)), 1.0


def _heart(u, v):
    x, y = 1.12 * u, -1.12 * v + 0.12  # the classic sextic heart, y up
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 < 0, 1.0


def _ring(u, v):
    rho2 = u**2 + v**2
    return (rho2 < 1) & (rho2 > 0.5**2), 1.0


def _cross(u, v):
    arm = 0.34
    return ((np.abs(u) < arm) & (np.abs(v) < 0.95)) | ((np.abs(v) < arm) & (np.abs(u) < 0.95)), 1.0


def _moon(u, v):
    return (u**2 + v**2 < 1) & ((u - 0.45) ** 2 + (v + 0.25) ** 2 > 0.82**2), 1.0


#: shape word -> function (u, v) -> (mask, shading)
SHAPES = {
    "ball": _ball,
    "cube": _cube,
    "pyramid": _pyramid,
    "star": _star,
    "heart": _heart,
    "ring": _ring,
    "cross": _cross,
    "moon": _moon,
}


# --------------------------------------------------------------------------- surface


def pattern_marks(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "plain":
        return np.zeros(u.shape, bool)
    if pattern == "striped":
        return ((u - v) / 0.6) % 1 < 0.45
    if pattern == "dotted":
        gu, gv = (u / 0.6 + 0.5) % 1 - 0.5, (v / 0.6 + 0.5) % 1 - 0.5
        return gu**2 + gv**2 < 0.3**2
    if pattern == "checkered":
        return (np.floor(u / 0.5) + np.floor(v / 0.5)) % 2 == 0
    raise ValueError(f"Unknown pattern {pattern!r}; expected one of {PATTERNS}.")


def mark_colour(colour: str) -> tuple[float, float, float]:
    """Marks contrast with the body: dark on light colours, white on dark ones."""
    r, g, b = COLOURS[colour]
    return (0.12, 0.1, 0.14) if 0.3 * r + 0.59 * g + 0.11 * b > 0.55 else (0.97, 0.97, 0.97)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def draw_object(u, v, shape, colour, pattern, finish, rng, outline_px: int):
    """The object layer on the canvas: ``(rgb (S, S, 3), mask (S, S))``."""
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {tuple(SHAPES)}.")
    if colour not in COLOURS:
        raise ValueError(f"Unknown colour {colour!r}; expected one of {tuple(COLOURS)}.")
    mask, shade = SHAPES[shape](u, v)
    body = np.asarray(COLOURS[colour], np.float32)
    rgb = np.broadcast_to(body, u.shape + (3,)).copy()
    marks = pattern_marks(pattern, u, v)
    rgb[marks] = mark_colour(colour)
    if finish == "wet":
        rgb *= 0.78
    rgb *= np.asarray(shade, np.float32)[..., None] if np.ndim(shade) else shade
    if finish == "shiny":  # a specular highlight and a brighter rim of light
        glint = np.exp(-((u + 0.35) ** 2 + (v + 0.4) ** 2) / (2 * 0.17**2))
        rgb = rgb * 1.08 + 0.9 * glint[..., None]
    elif finish == "wet":  # droplets: light centre, dark lower rim
        for _ in range(7):
            du, dv, rr = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.7), rng.uniform(0.09, 0.14)
            d2 = ((u - du) ** 2 + (v - dv) ** 2) / rr**2
            rgb[d2 < 1] = rgb[d2 < 1] * 0.6 + np.float32([0.32, 0.38, 0.45])
            rgb[(d2 < 0.3)] = (0.95, 0.98, 1.0)
    elif finish != "plain":
        raise ValueError(f"Unknown finish {finish!r}; expected one of {FINISHES}.")
    rgb[mask & ~erode(mask, outline_px)] = OUTLINE
    return np.clip(rgb, 0, 1), mask
