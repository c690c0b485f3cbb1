"""Image and tensor conversions shared by training callbacks, sampling and evaluation:
PIL images of any mode as 8-bit RGB (what every image reader here hands on), float image
batches as uint8 arrays, and image grids.

``Image.convert("RGB")`` clips instead of scaling: a 16-bit grey PNG (``I;16``) becomes
white, a float image (``F``) in [0, 1] black, and transparent pixels keep whatever colour
hides under them. :func:`to_rgb` maps each mode to the 8-bit RGB a viewer shows.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: What counts as an image file in a concept, reference or class-image folder (any case),
#: everywhere in the project; ``<name>_mask.png`` beside ``<name>.<suffix>`` is its subject mask.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_SUFFIX = "_mask"


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image of any mode, its values scaled, never clipped:
    16-bit grey (``I;16*``: /257), 32-bit integer grey (``I``: 16-bit range /257, or its own
    maximum beyond that), float grey (``F``: [0, 1] or [0, 255], else its own maximum),
    CMYK, palette and greyscale. Transparency (``RGBA``, ``LA``, ``PA``, a palette or
    grey image with a transparent colour) is composited onto white, as the image is seen.
    16-bit RGB PNGs already open as 8-bit ``RGB``."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / top
        else:
            scale = 1.0 / 257.0 if top <= 65535 else 255.0 / top
            if mode == "I" and top <= 255:
                scale = 1.0  # an 8-bit grey image that was stored as I
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) uint8 grid, row-major."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[k]
    return grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> latents (the VAE posterior mean, shifted and
    scaled as the denoiser sees them): the inverse of :func:`decode`."""
    z = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
    z = z.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    x = vae.decode(z).sample
    return (x / 2 + 0.5).clamp(0, 1)
