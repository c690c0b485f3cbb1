"""Per-cell randomness: the same x_T for the same (template, image index, seed) everywhere.

A *cell* is one image of the evaluation grid: a prompt template and an image index.
Every random draw of a cell comes from its own generator, seeded by a stable hash of
(stream, base seed, template, index). So every sampler starts the cell from the same
initial latent x_T (comparisons between samplers are paired), whatever the batch size,
the order of the cells or the device, and a stochastic sampler (ProFusion) draws its
extra noise from a separate stream that does not disturb x_T.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

#: Stream names; a new stochastic sampler adds its own name here.
LATENT_STREAM = "x_T"


def cell_seed(template: str, index: int, seed: int, stream: str = LATENT_STREAM) -> int:
    """A 63-bit seed from sha256 (stable across processes, unlike Python's ``hash``)."""
    key = f"{stream}\x1f{int(seed)}\x1f{int(index)}\x1f{template}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def cell_generator(template: str, index: int, seed: int, stream: str = LATENT_STREAM) -> torch.Generator:
    """A CPU generator for one cell and stream (CPU so that figures match across devices)."""
    return torch.Generator("cpu").manual_seed(cell_seed(template, index, seed, stream))


def initial_latents(
    template: str,
    index: int,
    seed: int,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x_T of one cell, ``shape`` = (C, h, w) of the UNet's latent, drawn in float32 on CPU."""
    x = torch.randn(tuple(shape), generator=cell_generator(template, index, seed))
    return x.to(device=device, dtype=dtype)


class CellNoise:
    """Successive N(0, I) draws for a batch of cells, one generator per cell and stream."""

    def __init__(self, cells: Sequence[tuple[str, int]], seed: int, stream: str):
        if stream == LATENT_STREAM:
            raise ValueError(f"stream {stream!r} is reserved for the initial latents; name the sampler's own stream")
        self.generators = [cell_generator(t, i, seed, stream) for t, i in cells]

    def draw(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        """(B, *shape): the next draw of every cell's generator."""
        x = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return x.to(device=device, dtype=dtype)
